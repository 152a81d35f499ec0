"""End-to-end rendering: sampling, geometry in world mm, attenuation, tissue-fixed speckle,
cross-backend agreement, the CLI."""
import math
import subprocess
import sys

import numpy as np
import pytest
import taichi as ti

from diffus_taichi import Pose, Volume, backend, get_probe, march, vecmath
from diffus_taichi.acoustics import AcousticMapping
from diffus_taichi.pose import rotvec_to_matrix
from diffus_taichi.simulator import Simulator


# ---------------------------------------------------------------------------------------------
@ti.kernel
def _sample(vol: ti.template(), pts: ti.template(), out: ti.template(), grad: ti.template()):
    for i in pts:
        v, g = march.trilinear(vol, pts[i], ti.Vector([-1.0, -1.0, -1.0]))
        out[i] = v
        grad[i] = g


@ti.kernel
def _exp_log(x: ti.template(), y: ti.template(), e: ti.template(), lg: ti.template()):
    for i in x:
        e[i] = vecmath.exp_f32(x[i])
        lg[i] = vecmath.log_f32(y[i])


def test_arithmetic_exp_log_match_libm_to_an_ulp(arch, rng):
    """vecmath.exp_f32 / log_f32 (the polynomials that let CPU loops vectorise) agree with
    e^x and ln y to ~1 f32 ulp over the normal f32 range, on every backend."""
    x = np.concatenate([rng.uniform(-87.0, 88.0, 20000), rng.uniform(-1e-3, 1e-3, 2000),
                        [0.0, -87.0, 88.0, 1.0, -0.34657359]]).astype(np.float32)
    y = np.exp(rng.uniform(-87.0, 88.0, len(x))).astype(np.float32)
    y[:4] = [1.0, 0.5, 2.0, 0.70710677]
    f = [ti.field(ti.f32, shape=len(x)) for _ in range(4)]
    f[0].from_numpy(x)
    f[1].from_numpy(y)
    _exp_log(*f)
    e_ref = np.exp(x.astype(np.float64))
    e_rel = np.abs(f[2].to_numpy() - e_ref) / e_ref
    assert e_rel.max() < 3.0 * 2.0 ** -24, e_rel.max()
    lg_ref = np.log(y.astype(np.float64))
    err = np.abs(f[3].to_numpy() - lg_ref)
    assert (err <= 3.0 * 2.0 ** -24 * np.maximum(np.abs(lg_ref), 1.0)).all(), err.max()
    assert f[3].to_numpy()[0] == 0.0                # ln 1 exactly


def test_trilinear_exact_on_linear_fields(arch, rng):
    shape = (9, 7, 8)
    coef = np.array([[0.3, -0.2, 0.5], [1.1, 0.4, -0.7], [-0.25, 0.9, 0.15]])   # channel x axis
    off = np.array([1.0, -2.0, 0.5])
    I = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    data = I @ coef.T + off
    vol = ti.Vector.field(3, ti.f32, shape=shape)
    vol.from_numpy(data.astype(np.float32))
    n = 200
    p = rng.uniform(0, np.array(shape) - 1.001, size=(n, 3))
    pts = ti.Vector.field(3, ti.f32, shape=n)
    pts.from_numpy(p.astype(np.float32))
    out = ti.Vector.field(3, ti.f32, shape=n)
    grad = ti.Vector.field(3, ti.f32, shape=n)
    _sample(vol, pts, out, grad)
    assert np.abs(out.to_numpy() - (p @ coef.T + off)).max() < 1e-4
    assert np.abs(grad.to_numpy() - coef[0]).max() < 1e-4
    # outside the grid the 'outside' value is returned
    pts.from_numpy(np.full((n, 3), -5.0, dtype=np.float32))
    _sample(vol, pts, out, grad)
    assert np.all(out.to_numpy() == -1.0)


# ---------------------------------------------------------------------------------------------
def _sphere_volume(centre_mm, radius_mm, affine, shape, tissue="grey_matter"):
    """Tissue-fraction volume: a sphere (partial-volume edge) of ``tissue`` in water."""
    I = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    world = I @ affine[:3, :3].T + affine[:3, 3]
    d = np.linalg.norm(world - centre_mm, axis=1)
    h = float(np.cbrt(abs(np.linalg.det(affine[:3, :3]))))
    frac = np.clip(0.5 - (d - radius_mm) / h, 0, 1).reshape(shape)
    return Volume(frac[..., None], affine, (tissue,), name="sphere")


def _sphere_case(oblique):
    centre = np.array([3.0, -2.0, 20.0])
    if oblique:
        Rm = rotvec_to_matrix(np.radians([20.0, -35.0, 50.0]))
        A = np.eye(4)
        A[:3, :3] = Rm @ np.diag([0.35, 0.4, 0.3])
        A[:3, 3] = centre - A[:3, :3] @ (np.array([64, 64, 64]) / 2.0)
        shape = (64, 64, 64)
    else:
        A = np.diag([0.3, 0.3, 0.3, 1.0])
        A[:3, 3] = centre - 0.3 * np.array([32, 32, 32])
        shape = (64, 64, 64)
    return centre, A, shape


@pytest.mark.parametrize("oblique", [False, True])
def test_sphere_appears_at_predicted_fan_position(cpu32, oblique):
    centre, A, shape = _sphere_case(oblique)
    radius = 2.0
    vol = _sphere_volume(centre, radius, A, shape)
    probe = get_probe("linear", width_mm=16.0, depth_mm=24.0, n_lines=128, n_samples=256,
                      image_px=(160, 160))
    pose = Pose.look_at((1.2, -2.0, 0.0), (0.15, 0.0, 1.0), (1.0, 0.0, 0.0))
    sim = Simulator(vol, probe=probe, arch="cpu", speckle=False, tgc_db_per_cm=0.0,
                    dynamic_range_db=60.0, gain_db=30.0)
    fan = sim.render(pose)
    # predicted: the front pole of the sphere, seen along the probe's axial direction
    c_probe = pose.rotation.T @ (centre - np.array(pose.translation_mm))
    x_pred, z_pred = c_probe[0], c_probe[2] - radius
    xs, zs = probe.fan_axes_mm()
    col_pred = np.interp(x_pred, xs, np.arange(len(xs)))
    row_pred = np.interp(z_pred, zs, np.arange(len(zs)))
    # the front cap of the sphere: centroid (columns) of the bright arc, and its row there; with a
    # realistically narrow beam (lambda z / D) single-pixel maxima follow the voxel partial volume
    prof = fan.max(0)
    cols = np.flatnonzero(prof >= prof.max() - 0.05)          # within 2.5 dB of the peak
    col = float(np.sum(cols * prof[cols]) / np.sum(prof[cols]))
    row = int(np.argmax(fan[:, int(round(col))]))
    assert fan.max() > 0.5
    assert abs(col - col_pred) <= 1.5 and abs(row - row_pred) <= 1.0, \
        (row, col, row_pred, col_pred)


# ---------------------------------------------------------------------------------------------
def test_uniform_attenuation_slope(cpu32):
    alpha = 0.5   # dB/cm/MHz
    probe = get_probe("linear", width_mm=20.0, depth_mm=40.0, n_lines=256, n_samples=512,
                      image_px=(64, 64), frequency_mhz=5.0)
    depth_cm = probe.sample_depths_mm() / 10.0
    expected = -2 * alpha * probe.frequency_mhz          # dB/cm, round trip
    inside = (depth_cm > 0.3) & (depth_cm < 3.5)
    env_db = {}
    for a in (alpha, 0.0):
        mapping = AcousticMapping("tissue", overrides={"white_matter": (1.62, a, 0.15)})
        sim = Simulator("uniform", probe=probe, mapping=mapping, arch="cpu", tgc_db_per_cm=0.0)
        sim.render()
        st = sim.stages()
        if a == alpha:   # the two-way gain of the model, exactly
            g_db = 20 * np.log10(st["two_way_gain"].mean(0))
            slope = np.polyfit(depth_cm[inside], g_db[inside], 1)[0]
            assert slope == pytest.approx(expected, rel=1e-3)
        env_db[a] = 10 * np.log10((st["envelope"][:, inside] ** 2).mean(0))
    # what an observer measures on the speckle envelope, relative to a non-attenuating reference
    # block (reference-phantom method: removes the depth dependence of the beam)
    slope_env = np.polyfit(depth_cm[inside], env_db[alpha] - env_db[0.0], 1)[0]
    assert slope_env == pytest.approx(expected, rel=0.05)


# ---------------------------------------------------------------------------------------------
def test_speckle_fixed_in_tissue_when_probe_slides(cpu32):
    probe = get_probe("linear", width_mm=25.5, depth_mm=30.0, n_lines=256, n_samples=300,
                      image_px=(64, 64))
    sim = Simulator("uniform", probe=probe, arch="cpu", tgc_db_per_cm=0.0)
    base = sim.volume.default_pose
    dx = probe.width_mm / (probe.n_lines - 1)              # one line spacing
    k, m = 7, 11
    sim.render(base)
    s0 = sim.stages()
    # slide laterally by k line spacings in the image plane
    sim.render(base.moved((k * dx, 0, 0)))
    s1 = sim.stages()
    a, b = s0["scatterers"][k:], s1["scatterers"][:-k]
    assert np.abs(a - b).max() <= 1e-3 * np.abs(a).max()    # f32 world positions (see below)
    M = sim.M
    ea, eb = s0["envelope"][k + M:-M], s1["envelope"][M:-k - M]
    assert np.abs(ea - eb).max() <= 1e-3 * ea.max()
    # slide axially by m samples: the same world points carry the same scatterers
    sim.render(base.moved((0, 0, m * probe.sample_spacing_mm)))
    s2 = sim.stages()
    a, b = s0["scatterers"][:, m:-5], s2["scatterers"][:, : -m - 5]
    # the coherent phase 2k (p - x).d of each scatterer is computed from f32 world positions
    # (ulp ~4e-6 mm at 30 mm, 2k = 73 rad/mm at 9 MHz): agreement to ~3e-4
    assert np.abs(a - b).max() <= 1e-3 * np.abs(a).max()
    aq, bq = s0["scatterers_q"][:, m:-5], s2["scatterers_q"][:, : -m - 5]
    assert np.abs(aq - bq).max() <= 1e-3 * np.abs(aq).max()
    # a different seed is a different tissue realisation
    sim2 = Simulator("uniform", probe=probe, arch="cpu", seed=2)
    sim2.render(base)
    c = np.corrcoef(sim2.stages()["scatterers"].ravel(), s0["scatterers"].ravel())[0, 1]
    assert abs(c) < 0.05


# ---------------------------------------------------------------------------------------------
def test_fan_looks_like_ultrasound(cpu32, phantom_volume):
    probe = get_probe("craniotomy", n_lines=128, n_samples=256, image_px=(128, 128))
    sim = Simulator(phantom_volume, probe=probe, arch="cpu")
    fan = sim.render()
    _, _, inside = probe.scan_grid()
    assert np.all(fan[~inside] == 0.0)                   # black outside the sector
    assert fan[inside].mean() > 0.1                      # tissue is visible
    assert fan.min() >= 0.0 and fan.max() <= 1.0
    # speckle: granular texture, contrast (std/mean at each depth) near Rayleigh's 0.523 (the
    # phantom's tissue is not uniform, so somewhat above; exact statistics: test_physics_validation)
    env = sim.stages()["envelope"][30:100, 40:200]
    env = env / env.mean(axis=0)
    assert 0.4 < env.std() < 0.75


def _render_all_models(arch, volume):
    probe = get_probe("craniotomy", n_lines=96, n_samples=192, image_px=(128, 128))
    out = {}
    for model in ("primary", "layered", "reverb"):
        sim = Simulator(volume, probe=probe, arch=arch, echo_model=model)
        out[model] = sim.render()
    return out


def test_cpu_and_vulkan_images_agree(phantom_volume):
    if not backend.arch_supported("vulkan"):
        pytest.skip("vulkan unavailable")
    backend.ensure("cpu", "f32")
    ref = _render_all_models("cpu", phantom_volume)
    backend.ensure("vulkan", "f32")
    got = _render_all_models("vulkan", phantom_volume)
    for model in ref:
        err = np.abs(ref[model] - got[model]).max() / np.abs(ref[model]).max()
        assert err <= 1e-4, (model, err)


# ---------------------------------------------------------------------------------------------
def test_cli_render_writes_figure_and_stages(tmp_path):
    out, npz = tmp_path / "fan.png", tmp_path / "stages.npz"
    cmd = [sys.executable, "-m", "diffus_taichi", "render", "--volume", "phantom", "--arch", "cpu",
           "--lines", "64", "--samples", "128", "--image-px", "96", "--pose", "0,0,66,180,0,0",
           "--out", str(out), "--save-npz", str(npz)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    import matplotlib.image as mpimg
    img = mpimg.imread(out)
    assert img.shape[0] > 300 and img.std() > 0.05
    z = np.load(npz)
    for key in ("impedance_MRayl", "echo", "envelope", "bmode_lines", "fan", "pose_matrix",
                "fan_x_mm", "mri_reslice"):
        assert key in z.files
    assert z["fan"].shape == (96, 96) and z["echo"].shape == (64, 128)
    assert np.allclose(z["pose_matrix"][:3, 3], [0, 0, 66])
    # rotation vector of 180 deg about x: axial points down (-z)
    assert np.allclose(z["pose_matrix"][:3, 2], [0, 0, -1], atol=1e-9)


def test_cli_reports_bad_input_without_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "diffus_taichi", "render", "--volume",
                          str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "x.png")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "not found" in res.stderr and "Traceback" not in res.stderr
