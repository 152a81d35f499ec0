"""Pose (rotation vectors, matrices, parsing, look_at, moved), the Taichi ray kernel against the
NumPy pose, and probe geometry (line coordinates, fan grid area, extent, presets)."""
import math

import numpy as np
import pytest

from diffus_taichi import PRESETS, Pose, Probe, Volume, get_probe, matrix_to_rotvec, rotvec_to_matrix

TOL = 1e-9


# --------------------------------------------------------------------------------------------
# rotations
# --------------------------------------------------------------------------------------------
def _random_unit(rng, n):
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _test_angles(rng):
    """100 angles in [0, pi]: generic ones plus angles near 0 and near pi."""
    near0 = [0.0, 1e-14, 1e-12, 1e-10, 1e-9, 1e-8, 3e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3]
    near_pi = [math.pi - e for e in (1e-2, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 5e-6, 1e-6, 1e-7,
                                      1e-8, 1e-10, 1e-12)] + [math.pi]
    generic = rng.uniform(0.0, math.pi, 100 - len(near0) - len(near_pi))
    return np.concatenate([near0, near_pi, generic])


def _is_rotation(R, tol=1e-12):
    return np.abs(R.T @ R - np.eye(3)).max() < tol and abs(np.linalg.det(R) - 1) < tol


def test_rotvec_to_matrix_is_a_rotation_about_the_axis(rng):
    angles = _test_angles(rng)
    axes = _random_unit(rng, len(angles))
    for th, k in zip(angles, axes):
        R = rotvec_to_matrix(k * th)
        assert _is_rotation(R)
        np.testing.assert_allclose(R @ k, k, atol=1e-12)            # the axis is fixed
        assert abs((np.trace(R) - 1) / 2 - math.cos(th)) < 1e-12      # by the angle th


def test_rotvec_matrix_round_trip_matrix_space(rng):
    """R -> rotvec -> R reproduces R to 1e-9 for 100 rotations incl. angles near 0 and pi."""
    angles = _test_angles(rng)
    axes = _random_unit(rng, len(angles))
    bad = []
    for th, k in zip(angles, axes):
        R = rotvec_to_matrix(k * th)
        w = matrix_to_rotvec(R)
        assert np.linalg.norm(w) <= math.pi + 1e-12
        err = np.abs(rotvec_to_matrix(w) - R).max()
        if err > TOL:
            bad.append((math.pi - th, err))
    assert not bad, f"matrix round trip error > {TOL} for (pi - angle, error): {bad}"


def test_rotvec_matrix_round_trip_rotvec_space(rng):
    """rotvec -> R -> rotvec returns the same vector to 1e-9 for angles in [0, pi) (at exactly pi
    w and -w are the same rotation, so the matrix test covers it)."""
    angles = _test_angles(rng)
    axes = _random_unit(rng, len(angles))
    bad = []
    for th, k in zip(angles, axes):
        if th > math.pi - 1e-7:
            continue
        w = k * th
        err = np.abs(matrix_to_rotvec(rotvec_to_matrix(w)) - w).max()
        if err > TOL:
            bad.append((math.pi - th, err))
    assert not bad, f"rotvec round trip error > {TOL} for (pi - angle, error): {bad}"


def _random_pose(rng, t_scale=50.0, max_angle=math.pi * 0.95):
    k = _random_unit(rng, 1)[0]
    return Pose(rng.uniform(-t_scale, t_scale, 3), k * rng.uniform(0, max_angle))


def test_pose_from_matrix_round_trip(rng):
    for _ in range(50):
        P = _random_pose(rng)
        Q = Pose.from_matrix(P.matrix)
        np.testing.assert_allclose(Q.as_vector(), P.as_vector(), atol=TOL, rtol=0)
        np.testing.assert_allclose(Q.matrix, P.matrix, atol=TOL, rtol=0)


def test_pose_string_round_trip(rng):
    for _ in range(50):
        P = _random_pose(rng)
        Q = Pose.parse(P.to_string())
        # to_string keeps 4 decimals (mm, degrees)
        np.testing.assert_allclose(Q.translation_mm, P.translation_mm, atol=5.1e-5, rtol=0)
        np.testing.assert_allclose(np.degrees(Q.rotvec_rad), np.degrees(P.rotvec_rad),
                                   atol=5.1e-5, rtol=0)
        assert Pose.parse(Q.to_string()).to_string() == Q.to_string()


def test_pose_parse_spaces_and_degrees():
    P = Pose.parse("10 -2.5 3 0 0 90")
    np.testing.assert_allclose(P.translation_mm, (10, -2.5, 3))
    np.testing.assert_allclose(P.rotvec_rad, (0, 0, math.pi / 2))
    np.testing.assert_allclose(P.rotation @ [1, 0, 0], [0, 1, 0], atol=1e-12)


@pytest.mark.parametrize("suffix", [".txt", ".npy"])
def test_pose_parse_matrix_file(tmp_path, rng, suffix):
    for i in range(5):
        P = _random_pose(rng)
        p = tmp_path / f"pose{i}{suffix}"
        if suffix == ".npy":
            np.save(p, P.matrix)
        else:
            np.savetxt(p, P.matrix)
        Q = Pose.parse(str(p))
        np.testing.assert_allclose(Q.matrix, P.matrix, atol=TOL, rtol=0)
        np.testing.assert_allclose(Q.as_vector(), P.as_vector(), atol=TOL, rtol=0)


def test_look_at_frame(rng):
    for _ in range(30):
        origin = rng.uniform(-50, 50, 3)
        axial = rng.normal(size=3) * rng.uniform(0.1, 10)
        hint = rng.normal(size=3)
        P = Pose.look_at(origin, axial, hint)
        R = P.rotation
        assert _is_rotation(R, 1e-9)
        np.testing.assert_allclose(R[:, 2], axial / np.linalg.norm(axial), atol=1e-9)
        # lateral: the hint with its axial component removed, normalised
        lat = hint - R[:, 2] * (hint @ R[:, 2])
        np.testing.assert_allclose(R[:, 0], lat / np.linalg.norm(lat), atol=1e-9)
        np.testing.assert_allclose(np.cross(R[:, 2], R[:, 0]), R[:, 1], atol=1e-9)
        np.testing.assert_allclose(P.translation_mm, origin, atol=1e-12)
        # probe-frame points map as x_world = R x + t
        np.testing.assert_allclose(P.probe_to_world([0, 0, 7.0]), origin + 7.0 * R[:, 2], atol=1e-9)


def test_look_at_straight_down():
    P = Pose.look_at((1, 2, 3), (0, 0, -1), (1, 0, 0))
    np.testing.assert_allclose(P.rotation, [[1, 0, 0], [0, -1, 0], [0, 0, -1]], atol=1e-12)


def test_moved_translates_along_probe_axes(rng):
    for _ in range(20):
        P = _random_pose(rng)
        R = P.rotation
        t = np.asarray(P.translation_mm)
        for axis in range(3):
            d = np.zeros(3)
            d[axis] = 2.5
            Q = P.moved(d)
            np.testing.assert_allclose(np.asarray(Q.translation_mm) - t, 2.5 * R[:, axis], atol=1e-9)
            np.testing.assert_allclose(Q.rotation, R, atol=1e-9)
        d = rng.normal(size=3)
        np.testing.assert_allclose(P.moved(d).translation_mm, P.probe_to_world(d), atol=1e-9)


def test_moved_rotates_in_probe_frame(rng):
    for _ in range(20):
        P = _random_pose(rng, max_angle=2.5)
        dw = rng.normal(size=3) * 0.2
        Q = P.moved(d_rotvec_probe_rad=dw)
        np.testing.assert_allclose(Q.rotation, P.rotation @ rotvec_to_matrix(dw), atol=1e-9)
        np.testing.assert_allclose(Q.translation_mm, P.translation_mm, atol=1e-12)
        # a rotation about the probe's own axial axis keeps the axial direction
        Q2 = P.moved(d_rotvec_probe_rad=(0, 0, 0.3))
        np.testing.assert_allclose(Q2.rotation[:, 2], P.rotation[:, 2], atol=1e-9)


# --------------------------------------------------------------------------------------------
# Taichi ray kernel vs NumPy pose
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["craniotomy", "linear"])
def test_make_rays_matches_numpy(arch, rng, kind):
    from diffus_taichi.simulator import Simulator

    n = 24
    vol = Volume.from_array(rng.random((n, n, n)), spacing_mm=1.0)
    probe = get_probe(kind, n_lines=32, n_samples=64, image_px=(64, 64), depth_mm=30.0)
    sim = Simulator(vol, probe=probe, arch=arch)
    assert sim.arch == arch
    o, d = probe.line_geometry()
    poses = [Pose.from_vector(np.zeros(6)),
             Pose.look_at((0, 0, 12.0), (0, 0, -1), (1, 0, 0)),
             Pose((1.0, -2.0, 3.0), (0.0, 0.0, math.pi - 1e-4)),
             Pose((0.5, 0.5, 0.5), (1e-7, -2e-7, 0.0))]
    poses += [Pose(rng.uniform(-10, 10, 3), _random_unit(rng, 1)[0] * rng.uniform(0, math.pi))
              for _ in range(4)]
    for P in poses:
        sim.render(P)
        st = sim.stages()
        ro, rd = st["ray_origin_mm"], st["ray_direction"]
        assert ro.shape == (32, 3) and rd.shape == (32, 3)
        np.testing.assert_allclose(ro, P.probe_to_world(o), atol=1e-4, rtol=0,
                                   err_msg=f"ray origins, pose {P.to_string()}, arch {arch}")
        np.testing.assert_allclose(rd, d @ P.rotation.T, atol=1e-4, rtol=0,
                                   err_msg=f"ray directions, pose {P.to_string()}, arch {arch}")
        # the same rays in voxel index coordinates
        vo, vd = sim.vo.to_numpy(), sim.vd.to_numpy()
        np.testing.assert_allclose(vo, vol.world_to_index(P.probe_to_world(o)), atol=1e-4, rtol=0)
        A = vol.world_to_voxel[:3, :3]
        np.testing.assert_allclose(vd, (d @ P.rotation.T) @ A.T, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------
# probe geometry
# --------------------------------------------------------------------------------------------
GEOMETRY_PROBES = {
    **PRESETS,
    "small-curvilinear": Probe(kind="curvilinear", radius_mm=25.0, fov_deg=100.0, depth_mm=40.0,
                               n_lines=17, n_samples=33, image_px=(200, 300)),
    "small-linear": Probe(kind="linear", width_mm=20.0, depth_mm=35.0, n_lines=9, n_samples=40,
                          image_px=(128, 96)),
}


@pytest.mark.parametrize("name", list(GEOMETRY_PROBES))
def test_line_coords_invert_line_geometry(name):
    p = GEOMETRY_PROBES[name]
    o, d = p.line_geometry()
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(o[:, 1], 0.0)
    np.testing.assert_allclose(d[:, 1], 0.0)
    depths = np.linspace(0.0, p.depth_mm, 23)
    if p.kind == "curvilinear" and p.radius_mm == 0:
        depths = depths[1:]        # a sector's lines all start at the apex: line index undefined
    pts = o[:, None, :] + depths[None, :, None] * d[:, None, :]      # (lines, depths, 3)
    li, si = p.probe_to_line_coords(pts[..., 0], pts[..., 2])
    J = np.broadcast_to(np.arange(p.n_lines)[:, None], li.shape)
    np.testing.assert_allclose(li, J, atol=1e-9)
    np.testing.assert_allclose(si, np.broadcast_to(depths / p.sample_spacing_mm, si.shape),
                               atol=1e-9)
    # sample depths are the same thing seen from the other side
    np.testing.assert_allclose(p.sample_depths_mm()[-1], p.depth_mm, atol=1e-9)


@pytest.mark.parametrize("name", list(GEOMETRY_PROBES))
def test_scan_grid_area_matches_fan(name):
    p = GEOMETRY_PROBES[name]
    li, si, inside = p.scan_grid()
    H, W = p.image_px
    assert li.shape == si.shape == inside.shape == (H, W)
    px = p.fan_pixel_mm()
    area = inside.sum() * px * px
    if p.kind == "linear":
        expected = p.width_mm * p.depth_mm
    else:
        R, D = p.radius_mm, p.depth_mm
        expected = math.radians(p.fov_deg) / 2 * ((R + D) ** 2 - R ** 2)
    assert abs(area / expected - 1) < 0.02, (area, expected)
    # inside pixels have coordinates within the line/sample ranges
    assert li[inside].min() >= 0 and li[inside].max() <= p.n_lines - 1
    assert si[inside].min() >= 0 and si[inside].max() <= p.n_samples - 1


@pytest.mark.parametrize("name", list(GEOMETRY_PROBES))
def test_fan_extent_contains_lines_and_outline(name):
    p = GEOMETRY_PROBES[name]
    x0, x1, z0, z1 = p.fan_extent_mm()
    o, d = p.line_geometry()
    eps = 1e-9
    ends = o + p.depth_mm * d
    mids = o + 0.5 * p.depth_mm * d
    for pts in (o, ends, mids):
        assert np.all((pts[:, 0] >= x0 - eps) & (pts[:, 0] <= x1 + eps))
        assert np.all((pts[:, 2] >= z0 - eps) & (pts[:, 2] <= z1 + eps))
    ol = p.outline_mm(256)
    assert np.all((ol[:, 0] >= x0 - eps) & (ol[:, 0] <= x1 + eps))
    assert np.all((ol[:, 1] >= z0 - eps) & (ol[:, 1] <= z1 + eps))
    # the extent is tight: the outermost line end points touch it
    assert math.isclose(min(ends[:, 0].min(), o[:, 0].min()), x0, abs_tol=1e-9)
    assert math.isclose(max(ends[:, 0].max(), o[:, 0].max()), x1, abs_tol=1e-9)
    assert math.isclose(z1, p.depth_mm, abs_tol=1e-9)
    # the fan image covers the extent
    x, z = p.fan_axes_mm()
    px = p.fan_pixel_mm()
    assert x[0] <= x0 + px / 2 + eps and x[-1] >= x1 - px / 2 - eps
    assert z[0] <= z0 + px / 2 + eps and z[-1] >= z1 - px / 2 - eps


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate(name):
    p = PRESETS[name]
    p.validate()
    assert p.name == name
    assert get_probe(name) is p
    assert p.kind in ("curvilinear", "linear")
    q = get_probe(name, n_lines=64, n_samples=128)
    assert (q.n_lines, q.n_samples) == (64, 128) and q.kind == p.kind and q.depth_mm == p.depth_mm
    assert p.sample_spacing_mm > 0 and p.wavelength_mm > 0 and p.axial_fwhm_mm() > 0
    assert np.all(p.lateral_fwhm_mm(p.sample_depths_mm()) > 0)


def test_sector_alias_is_zero_radius_curvilinear():
    p = Probe(kind="sector", fov_deg=60.0)
    assert p.kind == "curvilinear" and p.radius_mm == 0.0
    o, _ = p.line_geometry()
    np.testing.assert_allclose(o, 0.0, atol=1e-12)


def test_line_angles_symmetric():
    p = get_probe("craniotomy", n_lines=33)
    th = p.line_angles_rad()
    np.testing.assert_allclose(th, -th[::-1], atol=1e-15)
    np.testing.assert_allclose(th[[0, -1]], np.radians([-35.0, 35.0]), atol=1e-12)
    assert np.all(get_probe("linear").line_angles_rad() == 0)
