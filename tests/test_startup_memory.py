"""Issue #7 (start-up and memory): the lean loading and set-up paths give the same results as
the straightforward code they replace (behaviour only, no timing thresholds).

* NIfTI loading (slab reads, blockwise validation and normalisation) == the full-array reference;
* ``default_pose_for`` / ``surface_pose`` (slab passes, no argwhere) == the argwhere reference,
  with small blocks so that many slabs and a subsampling step > 1 are exercised;
* the built-in brain (uint8 build, on-disk cache) == the float reference build; the cache is
  keyed, rebuilt when unreadable, and optional (unwritable or disabled directory);
* the vectorised ``_tent_energy`` / ``speckle_power_factor`` and ``Probe.scan_grid`` == loops.
"""
import math
import os

import nibabel as nib
import numpy as np
import pytest

from diffus_taichi import builtin_volumes as bv
from diffus_taichi import image
from diffus_taichi import volume as V
from diffus_taichi.pose import Pose
from diffus_taichi.probe import PRESETS, get_probe


# --------------------------------------------------------------------------------------------
# references: the straightforward (full-array) versions
# --------------------------------------------------------------------------------------------
def ref_normalise(data, lo_pct=0.5, hi_pct=99.5):
    flat = data.reshape(-1)
    sub = flat[:: max(1, flat.size // 2_000_000)]
    lo, hi = np.percentile(sub, [lo_pct, hi_pct])
    if hi <= lo:
        lo, hi = float(flat.min()), float(flat.max())
    if hi <= lo:
        return np.zeros_like(data, dtype=np.float32)
    return np.clip((data - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def ref_load(path):
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    bad = ~np.isfinite(data)
    if bad.any():
        data = np.where(bad, np.nanmin(np.where(bad, np.nan, data)), data)
    return np.ascontiguousarray(ref_normalise(data)), img.affine


def ref_default_pose(vol):
    content = vol.display_channel() if vol.intensity_index is not None else vol.channels.sum(-1)
    mask = content > 0.2 * float(content.max() or 1.0)
    if not mask.any():
        return Pose.look_at(vol.centre_mm, (0, 0, -1), (1, 0, 0))
    idx = np.argwhere(mask)
    world = vol.voxel_to_world(idx[:: max(1, len(idx) // 200000)])
    c = world.mean(0)
    near = world[np.linalg.norm(world[:, :2] - c[:2], axis=1) < 5.0]
    top = (near if len(near) else world)[:, 2].max()
    return Pose.look_at((c[0], c[1], top + 1.0), (0, 0, -1), (1, 0, 0))


def ref_surface_pose(vol, direction, lateral_hint, content=None, standoff_mm=1.0, threshold=0.5):
    if content is None:
        content = vol.channels[..., [i for i, n in enumerate(vol.channel_names)
                                     if n != V.INTENSITY]].sum(-1)
    idx = np.argwhere(content > threshold)
    centre = vol.voxel_to_world(idx.mean(0))
    u = np.asarray(direction, dtype=np.float64)
    u /= np.linalg.norm(u)
    step = 0.25 * float(vol.spacing_mm.min())
    last_inside = 0.0
    for k in range(1, int(2000 / step)):
        p = centre + k * step * u
        ijk = np.rint(vol.world_to_index(p)).astype(int)
        if np.any(ijk < 0) or np.any(ijk >= np.array(vol.shape)):
            break
        if content[tuple(ijk)] > threshold:
            last_inside = k * step
    return Pose.look_at(centre + (last_inside + standoff_mm) * u, -u, lateral_hint)


def ref_brain():
    """The built-in brain as it was built before the uint8 path and the cache."""
    with np.load(bv.BRAIN_NPZ) as z:
        names = [str(n) for n in z["channel_names"]]
        chans = [z["t1"].astype(np.float32) / 255.0] + [z[n].astype(np.float32) / 255.0
                                                        for n in names]
        affine = z["affine"].astype(np.float64)
    vol = V.Volume(np.stack(chans, axis=-1), affine, (V.INTENSITY, *names), name="brain",
                   default_pose=Pose.from_vector(np.zeros(6)))
    mask = sum(vol.channel(n) for n in ("grey_matter", "white_matter") if n in names)
    vol.default_pose = ref_surface_pose(vol, (0.55, -0.05, 0.83), (0, 0, 1), content=mask,
                                        standoff_mm=0.5, threshold=0.3)
    c = vol.world_to_index(np.asarray(vol.default_pose.translation_mm))
    r_vox = bv.CRANIOTOMY_RADIUS_MM / vol.spacing_mm
    lo = np.maximum(np.floor(c - r_vox).astype(int), 0)
    hi = np.minimum(np.ceil(c + r_vox).astype(int) + 1, np.array(vol.shape))
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    ijk = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
    inside = np.linalg.norm(vol.voxel_to_world(ijk) - np.asarray(vol.default_pose.translation_mm),
                            axis=-1) < bv.CRANIOTOMY_RADIUS_MM
    for i, n in enumerate(vol.channel_names):
        if n in ("cortical_bone", "scalp"):
            vol.channels[sl + (i,)][inside] = 0.0
    return vol


def ref_tent_energy(v, spacing_cells, n_off=64):
    v = np.asarray(v, dtype=np.float64)
    pos = np.arange(len(v)) * spacing_cells
    tot = 0.0
    for f in (np.arange(n_off) + 0.5) / n_off:
        x = pos + f
        c = np.arange(-1, int(np.ceil(x.max())) + 2)
        w = np.clip(1.0 - np.abs(x[None, :] - c[:, None]), 0.0, None)
        tot += np.sum((w @ v) ** 2)
    return tot / n_off


def ref_speckle_power_factor(taps_i, taps_q, lat_w, step_mm, cell_mm, elev_w, line_spacing):
    from diffus_taichi.march import SCAT_AMP

    env = np.sqrt(np.asarray(taps_i) ** 2 + np.asarray(taps_q) ** 2)
    lat_w = np.asarray(lat_w, dtype=np.float64)
    S = lat_w.shape[0]
    el = np.sum(np.asarray(elev_w) ** 2, 1)
    ax = ref_tent_energy(env, step_mm / cell_mm)
    sp = np.broadcast_to(np.asarray(line_spacing, dtype=np.float64), (S,)) / cell_mm
    idx = np.unique(np.linspace(0, S - 1, min(S, 64)).astype(int))
    lat = np.interp(np.arange(S), idx, [ref_tent_energy(lat_w[i], sp[i]) for i in idx])
    return SCAT_AMP ** 2 * ax * lat * (2.0 / 3.0) * el


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 1000 voxels: every slab loop runs many times on small test volumes."""
    monkeypatch.setattr(V, "CHUNK_VOXELS", 1000)
    monkeypatch.setattr(bv, "CHUNK_VOXELS", 1000)


def _head(n=40, dtype=np.float32):
    g = np.linspace(-1, 1, n, dtype=np.float32)
    r2 = g[:, None, None] ** 2 + (g[None, :, None] / 0.9) ** 2 + (g[None, None, :] / 0.8) ** 2
    return np.where(r2 < 0.6, 0.5 + 0.3 * np.cos(10 * r2), 0.0).astype(dtype)


# --------------------------------------------------------------------------------------------
# NIfTI loading
# --------------------------------------------------------------------------------------------
def _nifti_cases(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((17, 19, 23)).astype(np.float32) * 1000
    oblique = np.array([[0.8, 0.2, 0, -10], [-0.1, 0.9, 0.3, 5], [0, -0.2, 1.1, 2], [0, 0, 0, 1]])
    nan = x.copy()
    nan[3, 4, 5], nan[10, :, 3], nan[0, 0, 0] = np.nan, np.inf, -np.inf
    spiky = np.zeros((12, 13, 14), np.float32)
    spiky[1, 2, 3], spiky[4, 5, 6] = 5.0, -2.0               # percentiles equal: min/max range
    cases = {
        "f32.nii": (x, None, None), "f32.nii.gz": (x, None, None),
        "f64.nii.gz": (x.astype(np.float64) * 1.0001, None, None),
        "i16_scaled.nii": ((rng.random((15, 10, 21)) * 3000 - 500).astype(np.int16), 0.37, 12.5),
        "i16_scaled.nii.gz": ((rng.random((15, 10, 21)) * 3000 - 500).astype(np.int16), 0.37, 12.5),
        "u8.nii": ((rng.random((9, 10, 11)) * 255).astype(np.uint8), None, None),
        "nan.nii": (nan, None, None), "four_d.nii.gz": (x[..., None], None, None),
        "oblique.nii": (x, None, None), "spiky.nii": (spiky, None, None),
        "constant.nii": (np.full((5, 6, 7), 3.0, np.float32), None, None),
        "head.nii.gz": (_head(36), None, None),
    }
    paths = []
    for name, (arr, slope, inter) in cases.items():
        aff = oblique if name.startswith("oblique") else np.diag([0.9, 1.1, 1.3, 1.0])
        img = nib.Nifti1Image(arr, aff)
        if slope is not None:
            img.header.set_slope_inter(slope, inter)
        p = str(tmp_path / name)
        nib.save(img, p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("blocks", ["default", "small"])
def test_load_nifti_equals_full_array_reference(tmp_path, request, blocks):
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    for p in _nifti_cases(tmp_path):
        vol = V.load_nifti(p)
        data, affine = ref_load(p)
        assert vol.channels.flags.c_contiguous and vol.channels.dtype == np.float32, p
        assert _same(vol.channels[..., 0], data), p
        ref_vol = V.Volume(data[..., None], affine, (V.INTENSITY,), default_pose=Pose.from_vector(np.zeros(6)))
        assert vol.default_pose == ref_default_pose(ref_vol), p


def test_corrupt_gzip_still_detected_with_one_pass(tmp_path):
    p = str(tmp_path / "good.nii.gz")
    nib.save(nib.Nifti1Image(np.random.default_rng(1).random((16, 16, 16)).astype(np.float32),
                             np.eye(4)), p)
    raw = bytearray(open(p, "rb").read())
    raw[-6] ^= 0xFF                          # the CRC/length trailer only: data inflates fine
    bad = tmp_path / "trailer.nii.gz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt or truncated"):
        V.load_nifti(str(bad))


def test_normalise_intensity_layouts_and_in_place(small_blocks):
    rng = np.random.default_rng(2)
    a = (rng.random((30, 20, 25)) * 7).astype(np.float32)
    for arr in (a, np.asfortranarray(a), a[::2, 1::3, :], (a * 100).astype(np.int16),
                np.asfortranarray(a.astype(np.float64))):
        keep = arr.copy()
        out = V.normalise_intensity(arr)
        assert _same(out, ref_normalise(arr))
        assert _same(arr, keep)                                    # input untouched
    b = a.copy()
    assert V.normalise_intensity(b, out=b) is b and _same(b, ref_normalise(a))
    with pytest.raises(ValueError, match="out must be"):
        V.normalise_intensity(a, out=np.empty((30, 20, 25), np.float64))


def test_from_array_never_modifies_the_callers_array():
    a = np.random.default_rng(3).random((10, 11, 12)).astype(np.float32)
    a[1, 2, 3] = np.nan
    keep = a.copy()
    vol = V.Volume.from_array(a)
    assert np.array_equal(a, keep, equal_nan=True)
    assert np.all(np.isfinite(vol.channels))


def test_all_finite_matches_numpy(small_blocks):
    rng = np.random.default_rng(4)
    a = rng.random((20, 21, 22)).astype(np.float32)
    for bad in (None, np.nan, np.inf, -np.inf):
        b = a.copy()
        if bad is not None:
            b[19, 20, 21] = bad
        for arr in (b, np.asfortranarray(b), b[:, ::2], b.astype(np.float64), b[..., None]):
            assert V._all_finite(arr) == bool(np.all(np.isfinite(arr)))
    assert V._all_finite(np.arange(10))


# --------------------------------------------------------------------------------------------
# poses from the content
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("blocks", ["default", "small"])
def test_default_pose_for_equals_argwhere_reference(request, blocks):
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    g = np.linspace(-1, 1, 90, dtype=np.float32)
    r2 = g[:, None, None] ** 2 + (g[None, :, None] / 0.9) ** 2 + (g[None, None, :] / 0.8) ** 2
    big = np.where(r2 < 1.5, 1.0 - 0.5 * r2, 0.0)      # > 400000 content voxels: step >= 2
    assert np.count_nonzero(big > 0.2 * big.max()) > 400000
    vols = [V.Volume.from_array(big, spacing_mm=0.7),
            V.Volume.from_array(_head(30), affine=np.array(
                [[0.8, 0.2, 0, -10], [-0.1, 0.9, 0.3, 5], [0, -0.2, 1.1, 2], [0, 0, 0, 1]])),
            V.Volume.from_array(np.zeros((6, 7, 8)), normalise=False)]
    tissues = np.stack([_head(34), 0.5 * _head(34)[::-1]], -1)   # no intensity channel: sum
    vols.append(V.Volume(tissues, np.eye(4), ("grey_matter", "white_matter")))
    for vol in vols:
        assert V.default_pose_for(vol) == ref_default_pose(vol)


@pytest.mark.parametrize("blocks", ["default", "small"])
def test_surface_pose_equals_argwhere_reference(request, blocks):
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    vol = bv.head_phantom(spacing_mm=2.0)
    for d in ((0.3, 0.1, 0.9), (0.55, -0.05, 0.83), (0, 0.1, -0.9)):
        assert bv.surface_pose(vol, d, (1, 0, 0)) == ref_surface_pose(vol, d, (1, 0, 0))
        c = vol.channels[..., 2]
        assert (bv.surface_pose(vol, d, (0, 1, 0), content=c, threshold=0.1, standoff_mm=0.5)
                == ref_surface_pose(vol, d, (0, 1, 0), content=c, threshold=0.1, standoff_mm=0.5))


# --------------------------------------------------------------------------------------------
# the built-in brain and its cache
# --------------------------------------------------------------------------------------------
def _assert_same_volume(a, b):
    assert _same(a.channels, b.channels)
    assert _same(a.affine, b.affine)
    assert a.channel_names == b.channel_names
    assert a.default_pose == b.default_pose


@pytest.fixture(scope="module")
def brain_reference():
    return ref_brain()


def test_brain_without_cache_equals_reference(monkeypatch, brain_reference):
    monkeypatch.setenv(bv.CACHE_ENV, "off")
    assert bv.cache_dir() is None
    _assert_same_volume(V.load_volume("brain"), brain_reference)


def test_brain_cache_written_then_read_identical(monkeypatch, tmp_path, brain_reference):
    d = tmp_path / "cache"
    monkeypatch.setenv(bv.CACHE_ENV, str(d))
    first = V.load_volume("brain")                              # builds and writes the entry
    files = sorted(os.listdir(d))
    assert len(files) == 2 and all(f.startswith("brain-") for f in files)
    assert not [f for f in files if f.endswith(".tmp")]
    calls = []
    monkeypatch.setattr(bv, "_brain_u8", lambda: calls.append(1))   # must not be needed now
    second = V.load_volume("brain")
    assert calls == []
    _assert_same_volume(first, brain_reference)
    _assert_same_volume(second, brain_reference)
    assert not np.shares_memory(first.channels, second.channels)
    assert second.channels.flags.writeable


def test_brain_cache_corrupt_entry_is_rebuilt(monkeypatch, tmp_path, brain_reference):
    d = tmp_path / "cache"
    monkeypatch.setenv(bv.CACHE_ENV, str(d))
    V.load_volume("brain")
    npy = [f for f in os.listdir(d) if f.endswith(".npy")][0]
    with open(d / npy, "r+b") as fh:                           # truncate the data
        fh.truncate(1000)
    _assert_same_volume(V.load_volume("brain"), brain_reference)
    assert os.path.getsize(d / npy) > 1000                     # rewritten
    (d / npy.replace(".npy", ".json")).write_text("{not json")
    _assert_same_volume(V.load_volume("brain"), brain_reference)


def test_brain_cache_unwritable_directory_is_harmless(monkeypatch, tmp_path, brain_reference):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv(bv.CACHE_ENV, str(blocker / "cache"))   # cannot be created (even as root)
    _assert_same_volume(V.load_volume("brain"), brain_reference)
    assert not (blocker / "cache").exists()


def test_brain_cache_key_depends_on_version(monkeypatch):
    k = bv._brain_cache_key()
    monkeypatch.setattr(bv, "BRAIN_CACHE_VERSION", bv.BRAIN_CACHE_VERSION + "x")
    assert bv._brain_cache_key() != k


def test_brain_cache_keeps_a_few_entries(tmp_path):
    for i in range(5):
        for ext in (".npy", ".json"):
            p = tmp_path / f"brain-{i}{ext}"
            p.write_text("x")
            os.utime(p, (1000 + i, 1000 + i))
    bv._prune_brain_cache(str(tmp_path), keep=3)
    assert sorted(os.listdir(tmp_path)) == sorted(f"brain-{i}{e}" for i in (2, 3, 4)
                                                  for e in (".npy", ".json"))


# --------------------------------------------------------------------------------------------
# pure-NumPy set-up of the Simulator
# --------------------------------------------------------------------------------------------
PROBES = [PRESETS[n] for n in PRESETS] + [
    get_probe("craniotomy", n_lines=256, n_samples=512, image_px=(512, 512)),
    get_probe("linear", n_lines=8, n_samples=64, image_px=(40, 50)),
    get_probe("phased", n_lines=2, n_samples=16, image_px=(16, 20)),
    get_probe("convex", n_lines=33, n_samples=1000, image_px=(30, 70))]


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: f"{p.name}-{p.n_lines}x{p.n_samples}")
def test_speckle_power_factor_equals_loop_reference(probe):
    ti_, tq = image.axial_taps(probe)
    lw = image.lateral_weights(probe)
    for cell in (0.08, 0.013, 0.5) if probe.n_lines > 2 else (0.08, 0.5):   # (the loop is slow)
        for n_el in (1, 3):
            _, w = image.elevation_planes(probe, n_el)
            got = image.speckle_power_factor(ti_, tq, lw, probe.sample_spacing_mm, cell, w,
                                             image.line_spacing_mm(probe))
            ref = ref_speckle_power_factor(ti_, tq, lw, probe.sample_spacing_mm, cell, w,
                                           image.line_spacing_mm(probe))
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)


def test_tent_energies_batched_equal_single_rows():
    rng = np.random.default_rng(5)
    Vw = rng.random((37, 9))
    a = rng.random(37) * 40 + 0.01
    single = np.array([ref_tent_energy(Vw[i], a[i]) for i in range(37)])
    for max_bins in (1, 5000, 1 << 20):                        # one row per batch .. all rows
        np.testing.assert_allclose(image._tent_energies(Vw, a, max_bins=max_bins), single,
                                   rtol=1e-12, atol=0)
    assert math.isclose(image._tent_energy(Vw[0], a[0]), single[0], rel_tol=1e-12)


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: f"{p.name}-{p.n_lines}x{p.n_samples}")
def test_scan_grid_equals_meshgrid_reference(probe):
    x, z = probe.fan_axes_mm()
    X, Z = np.meshgrid(x, z)
    li, si = probe.probe_to_line_coords(X, Z)
    inside = (li >= 0) & (li <= probe.n_lines - 1) & (si >= 0) & (si <= probe.n_samples - 1)
    got = probe.scan_grid()
    for g, r in zip(got, (li, si, inside)):
        assert _same(g, r) and g.flags.writeable


# --------------------------------------------------------------------------------------------
# storage of the acoustic-property volume (Simulator(storage=...)), one-launch uploads, and the
# guarded Taichi start-up patch
# --------------------------------------------------------------------------------------------
def _content_volume(n=40):
    """A head-like intensity volume with an empty margin (so that compact storage crops)."""
    return V.Volume.from_array(_head(n), spacing_mm=1.0, name="head")


def test_storage_policy():
    from diffus_taichi import property_volume as PVol

    big, small = PVol.AUTO_COMPACT_VOXELS, PVol.AUTO_COMPACT_VOXELS - 1
    assert PVol.resolve_storage("auto", "f32", False, big) == "compact"
    assert PVol.resolve_storage("auto", "f32", "pose", big) == "compact"
    assert PVol.resolve_storage("auto", "f32", False, small) == "lean"
    assert PVol.resolve_storage("auto", "f32", True, big) == "full"      # mapping gradients
    assert PVol.resolve_storage("auto", "f64", False, big) == "full"
    assert PVol.resolve_storage("lean", "f64", False, 10) == "lean"
    with pytest.raises(ValueError, match="storage must be one of"):
        PVol.resolve_storage("f16", "f32", False, 10)
    with pytest.raises(ValueError, match="mapping gradients"):
        PVol.resolve_storage("compact", "f32", True, 10)
    with pytest.raises(ValueError, match="precision 'f32'"):
        PVol.resolve_storage("compact", "f64", False, 10)


def test_storage_errors_from_simulator(cpu32):
    from diffus_taichi.simulator import Simulator

    probe = get_probe("linear", n_lines=8, n_samples=32, image_px=(16, 16))
    with pytest.raises(ValueError, match="storage must be one of"):
        Simulator(_content_volume(12), probe=probe, storage="half")
    with pytest.raises(ValueError, match="mapping gradients"):
        Simulator(_content_volume(12), probe=probe, storage="compact", requires_grad=True)


# compact (float16, content box) vs f32 storage: the fan images in [0, 1] agree to this
# (measured: max 1.8e-4, mean 4e-5 on cpu and vulkan)
COMPACT_ATOL = 2e-3
COMPACT_MEAN_ATOL = 2e-4


@pytest.mark.parametrize("mapping", ["transfer", "tissue", "t2"])
def test_lean_and_compact_storage_render_like_full(arch, mapping):
    from diffus_taichi.simulator import Simulator

    if mapping == "tissue":
        vol = bv.head_phantom(spacing_mm=2.5)
    else:
        vol = _content_volume(40)
    probe = get_probe("craniotomy", n_lines=32, n_samples=128, image_px=(64, 64))
    fans, sims = {}, {}
    for st in ("full", "lean", "compact"):
        s = sims[st] = Simulator(vol, probe=probe, mapping=mapping, storage=st)
        assert s.storage == st
        fans[st] = s.render()
    assert sims["full"].vol is not None and sims["lean"].vol is None and sims["compact"].vol is None
    assert sims["compact"].props.dtype == ti_f16()
    # lean: the same per-voxel arithmetic as the channel-field kernels
    np.testing.assert_array_equal(sims["lean"].props.to_numpy(), sims["full"].props.to_numpy())
    np.testing.assert_array_equal(fans["lean"], fans["full"])
    if mapping == "t2":                                   # MLP: never cropped
        assert not sims["compact"].props_cropped
    else:
        assert sims["compact"].props_cropped
        (x0, y0, z0), (nx, ny, nz) = sims["compact"].props_origin, sims["compact"].props.shape
        full = sims["full"].props.to_numpy()
        inner = full[x0:x0 + nx, y0:y0 + ny, z0:z0 + nz]
        np.testing.assert_allclose(sims["compact"].props.to_numpy().astype(np.float32), inner,
                                   rtol=2 ** -10, atol=1e-6)
        margin = full.copy()
        margin[x0:x0 + nx, y0:y0 + ny, z0:z0 + nz] = np.nan
        outside = sims["full"].outside.to_numpy()
        m = margin[~np.isnan(margin[..., 0])]
        np.testing.assert_allclose(m, np.broadcast_to(outside, m.shape), rtol=0, atol=1e-6)
    d = np.abs(fans["compact"].astype(np.float64) - fans["full"])
    assert d.max() <= COMPACT_ATOL and d.mean() <= COMPACT_MEAN_ATOL, (d.max(), d.mean())
    # a mapping change recomputes props from the NumPy channels (lean/compact) as from the field
    if mapping == "transfer":
        knots = np.asarray(sims["full"].mapping.knots, dtype=np.float64).copy()
        knots[1:, 0] *= 1.05
        out = {}
        for st in ("full", "lean", "compact"):
            sims[st].set_mapping_params(knots=knots)
            out[st] = sims[st].render()
        np.testing.assert_array_equal(out["lean"], out["full"])
        assert np.abs(out["compact"] - out["full"]).max() <= COMPACT_ATOL
        assert np.abs(out["full"] - fans["full"]).max() > 10 * COMPACT_ATOL   # it did change


@pytest.mark.parametrize("mapping", ["transfer", "tissue"])
def test_u8_channels_lazy_and_identical(arch, mapping):
    """volume.U8Channels: the float32 channels are made only when read, equal u8 / 255 bit for
    bit; the property kernels read the levels and give the same props (lean: bit for bit;
    compact: the same content box) and fans as the float32 volume; a render leaves them lazy."""
    from diffus_taichi.simulator import Simulator

    rng = np.random.default_rng(3)
    names = ("intensity", "grey_matter", "white_matter")
    u8 = np.zeros((24, 22, 20, 3), np.uint8)
    u8[3:20, 4:18, 2:17] = rng.integers(0, 256, (17, 14, 15, 3), dtype=np.uint8)
    u8.setflags(write=False)                   # as the brain's memory-mapped disk cache
    A = np.diag([1.5, 1.5, 1.5, 1.0])
    A[:3, 3] = -15.0
    ref = V.Volume(u8.astype(np.float32) / np.float32(255), A, names, name="f32")
    probe = get_probe("craniotomy", n_lines=32, n_samples=128, image_px=(64, 64))
    for st in ("lean", "compact"):
        lazy = V.Volume(V.U8Channels(u8), A, names, name="u8", default_pose=ref.default_pose)
        assert lazy.uint8_channels is not None and "channels" not in lazy.__dict__
        assert lazy.shape == ref.shape and lazy.n_channels == 3
        a = Simulator(lazy, probe=probe, mapping=mapping, storage=st)
        b = Simulator(ref, probe=probe, mapping=mapping, storage=st)
        assert a.props_origin == b.props_origin and a.props.shape == b.props.shape
        np.testing.assert_array_equal(a.props.to_numpy(), b.props.to_numpy())
        fa, fb = a.render(), b.render()
        np.testing.assert_array_equal(fa, fb)
        assert fa.std() > 0.01
        assert lazy.uint8_channels is not None                  # never made by a render
    ch = lazy.channels
    assert ch.dtype == np.float32 and lazy.uint8_channels is None
    assert np.array_equal(ch, ref.channels) and np.array_equal(ch, V.u8_lut()[u8])
    assert lazy.channels is ch                                  # made once
    lazy2 = V.Volume(V.U8Channels(u8), A, names, default_pose=ref.default_pose)
    lazy2.channels = ref.channels.copy()                        # assigned: the levels go
    assert lazy2.uint8_channels is None and "_u8" in lazy2.__dict__
    with pytest.raises(ValueError, match="uint8"):
        V.Volume(V.U8Channels(u8.astype(np.int16)), A, names)
    with pytest.raises(ValueError, match="channel names"):
        V.Volume(V.U8Channels(u8), A, names[:2])
    with pytest.raises(ValueError, match="empty"):
        V.Volume(V.U8Channels(np.zeros((0, 4, 4, 1), np.uint8)), A, names[:1])


def test_builtin_brain_channels_stay_uint8_through_a_render(cpu32):
    from diffus_taichi.simulator import Simulator

    vol = V.load_volume("brain")
    assert vol.uint8_channels is not None and vol.uint8_channels.dtype == np.uint8
    Simulator(vol, probe=get_probe("craniotomy", n_lines=16, n_samples=64, image_px=(32, 32)),
              storage="lean").render()
    assert vol.uint8_channels is not None


def ti_f16():
    import taichi as ti

    return ti.f16


def test_compact_pose_gradient_and_siblings(cpu32):
    """requires_grad='pose' works with compact storage (props need no gradient), and batch
    siblings share the cropped props and its voxel transform."""
    from diffus_taichi.simulator import Simulator

    vol = _content_volume(36)
    probe = get_probe("craniotomy", n_lines=16, n_samples=96, image_px=(48, 48))
    grads = {}
    for st in ("lean", "compact"):
        s = Simulator(vol, probe=probe, storage=st, requires_grad="pose", speckle="mean")
        target = s.render(vol.default_pose.moved((0.5, 0.0, 0.3), np.radians([1.0, 0, 0])))
        _, g = s.value_and_grad(vol.default_pose, target=target, loss="mse")
        grads[st] = g["pose"]
        if st == "compact":
            fan = s.render()
            sib = s.batch_sibling(2)
            assert sib.props is s.props and sib.props_origin == s.props_origin
            np.testing.assert_allclose(sib.render_batch([None, None])[0], fan, atol=1e-6)
    np.testing.assert_allclose(grads["compact"], grads["lean"], rtol=0.05,
                               atol=0.05 * np.abs(grads["lean"]).max())


def test_clear_all_gradients_clears_every_adjoint(cpu32):
    """fieldio.clear_all_gradients: every adjoint place is zeroed (scalar, vector, matrix and
    0-D fields of several shapes, one loop per shape), the primal values are untouched, and a
    field allocated after a first call (a new SNode tree) is cleared too (the memo of the
    groups is keyed on the trees)."""
    import taichi as ti

    from diffus_taichi import fieldio

    fs = [ti.field(ti.f32, shape=(7, 5), needs_grad=True),
          ti.Vector.field(3, ti.f32, shape=(7, 5), needs_grad=True),
          ti.Matrix.field(2, 2, ti.f32, shape=11, needs_grad=True),
          ti.field(ti.f32, shape=(), needs_grad=True)]
    plain = ti.field(ti.f32, shape=4)

    def fill():
        for f in fs:
            f.from_numpy(np.full(f.to_numpy().shape, 2.0, np.float32))
            f.grad.from_numpy(np.full(f.grad.to_numpy().shape, 3.0, np.float32))
        plain.from_numpy(np.full(4, 5.0, np.float32))

    fill()
    fieldio.clear_all_gradients()
    for f in fs:
        assert not f.grad.to_numpy().any() and (f.to_numpy() == 2.0).all()
    assert (plain.to_numpy() == 5.0).all()
    late = ti.field(ti.f32, shape=(13,), needs_grad=True)
    fs.append(late)
    fill()
    fieldio.clear_all_gradients()
    for f in fs:
        assert not f.grad.to_numpy().any() and (f.to_numpy() == 2.0).all()


def test_uploader_equals_from_numpy(arch):
    import taichi as ti

    from diffus_taichi.fieldio import Uploader

    rng = np.random.default_rng(6)
    fs = [ti.field(ti.f32, shape=7), ti.field(ti.f32, shape=(5, 3)),
          ti.Vector.field(3, ti.f32, shape=11), ti.Vector.field(2, ti.i32, shape=(4, 6)),
          ti.Matrix.field(4, 4, ti.f32, shape=()), ti.Vector.field(3, ti.f32, shape=()),
          ti.field(ti.i32, shape=6), ti.field(ti.f32, shape=())]
    shapes = [(7,), (5, 3), (11, 3), (4, 6, 2), (4, 4), (3,), (6,), ()]
    arrs = [rng.integers(-1000, 1000, sh) if f.dtype == ti.i32 else rng.standard_normal(sh)
            for f, sh in zip(fs, shapes)]
    up = Uploader(fs)
    for k in (1, -3):
        up(*[a * k for a in arrs])
        for f, a in zip(fs, arrs):
            got = f.to_numpy()
            assert np.array_equal(got, (a * k).astype(got.dtype))
    with pytest.raises(ValueError, match="shape"):
        up(*arrs[:-1], np.zeros(3))


def test_fast_textwrap_equals_textwrap():
    import glob
    import random
    import textwrap

    import taichi

    from diffus_taichi import backend

    assert backend.PATCHES.get("pos_info_textwrap") in ("applied", "already applied")
    from taichi.lang.ast import ast_transformer_utils as atu
    assert atu.TextWrapper is backend._FastTextWrapper
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = glob.glob(os.path.join(here, "diffus_taichi", "*.py")) + glob.glob(
        os.path.join(os.path.dirname(taichi.__file__), "lang", "**", "*.py"), recursive=True)
    lines = ["", " ", "\t x", "a\tb", "x" * 80, "x" * 81, " " * 81, "é x", "a \xa0 ", "a\x1c",
             "a \x1f b\x1d ",
             "a-b-c " * 20, "  foo  ", "\x0c"]
    for f in files:
        with open(f, encoding="utf-8") as fh:
            lines += fh.read().split("\n")
    rnd = random.Random(0)
    for code in lines:
        texts = [code]
        for _ in range(2):          # get_pos_info's hints: spaces and carets padded to the line
            a = rnd.randint(0, len(code))
            b = rnd.randint(a, len(code))
            texts.append((" " * a + "^" * (b - a)).ljust(len(code)))
        for t in texts:
            for _ in range(2):      # the second call hits the memo
                assert backend._FastTextWrapper(width=80).wrap(t) == \
                    textwrap.TextWrapper(width=80).wrap(t), repr(t)


def test_pos_info_memo_equals_get_pos_info():
    """The memoised ASTTransformerContext.get_pos_info (taichi_patches) returns the original's
    message for every statement and expression node (one-line and multi-line) of the package's
    kernels and ti.funcs, at two indents, on the first call and from the memo."""
    import ast
    import glob
    import types

    from taichi.lang.ast import ast_transformer_utils as atu

    from diffus_taichi import backend

    assert backend.PATCHES.get("pos_info_memo") in ("applied", "already applied")
    patched = atu.ASTTransformerContext.get_pos_info
    original = patched.__wrapped__
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    n = multi = 0
    for f in sorted(glob.glob(os.path.join(here, "diffus_taichi", "*.py"))):
        with open(f, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        for fn in ast.parse("\n".join(lines)).body:
            if not (isinstance(fn, ast.FunctionDef) and any(
                    "ti." in ast.unparse(d) for d in fn.decorator_list)):
                continue
            start = fn.decorator_list[0].lineno
            src = lines[start - 1:fn.end_lineno]
            tree = ast.parse("\n".join(src))         # as Taichi: lines numbered from the def
            for indent in (0, 4):                    # (Taichi's dedent of nested functions)
                ctx = types.SimpleNamespace(file=f, lineno_offset=start - 1, indent=indent,
                                            src=src, func=types.SimpleNamespace(
                                                func=types.SimpleNamespace(__name__=fn.name)))
                for node in ast.walk(tree):
                    if isinstance(node, (ast.stmt, ast.expr)):
                        want = original(ctx, node)
                        assert patched(ctx, node) == want and patched(ctx, node) == want
                        n += 1
                        multi += node.lineno != node.end_lineno
    assert n > 10000 and multi > 500


def test_source_memo_equals_getsourcelines():
    """kernel_impl.getsourcelines / getsourcefile memoised per function (taichi_patches): the
    original's result, and a fresh list each call (callers may not share it)."""
    from taichi.lang import kernel_impl as ki

    from diffus_taichi import backend, fused, march, rays

    assert backend.PATCHES.get("source_memo") in ("applied", "already applied")
    for obj in (march.scatterer_sum, march.fast_cos_sin, rays.rodrigues, rays.mat3_vec,
                fused.march_echo_iq, fused.pulse):
        fn = getattr(obj, "func", None) or getattr(obj, "_primal", None) or obj
        fn = getattr(fn, "func", fn)
        for name in ("getsourcelines", "getsourcefile"):
            got1, got2 = getattr(ki, name)(fn), getattr(ki, name)(fn)
            assert got1 == got2 == getattr(ki, name).__wrapped__(fn)
        a, b = ki.getsourcelines(fn), ki.getsourcelines(fn)
        assert a[0] is not b[0]
        a[0].clear()
        assert ki.getsourcelines(fn)[0] == b[0] and len(b[0]) > 1


def test_gc_paused_during_kernel_front_end():
    """Kernel.materialize runs with the cyclic collector paused (taichi_patches.gc_paused) and
    leaves it as it found it: enabled, disabled, and after an exception."""
    import gc

    from taichi.lang import kernel_impl as ki

    from diffus_taichi import backend, taichi_patches as tp

    assert backend.PATCHES.get("gc_paused_front_end") in ("applied", "already applied")
    assert getattr(ki.Kernel.materialize, "_diffus_patch", False)
    seen = []

    def probe_fn(x):
        seen.append(gc.isenabled())
        if x == "raise":
            raise KeyError(x)
        return x

    wrapped = tp.gc_paused(probe_fn)
    was = gc.isenabled()
    try:
        for start in (True, False):
            (gc.enable if start else gc.disable)()
            assert wrapped(3) == 3
            assert gc.isenabled() is start
            with pytest.raises(KeyError):
                wrapped("raise")
            assert gc.isenabled() is start
    finally:
        (gc.enable if was else gc.disable)()
    assert seen == [False] * 4


def test_inside_class_patch_equals_original(tmp_path, monkeypatch):
    """kernel_impl._inside_class patched by the package's import hook (inside_class_frozen):
    the original's answer for a module-level decoration (import machinery frame, a <frozen>
    pseudo-file), a class body (True), exec'd code (<string>) and a <...> pseudo-file that
    linecache holds (answered by the original); and a fresh interpreter gets the patch during
    ``import taichi`` itself (installed before the package imports Taichi)."""
    import importlib
    import linecache
    import subprocess
    import sys

    from taichi.lang import kernel_impl as ki

    from diffus_taichi import taichi_patches as tp

    assert tp.PATCHES.get("inside_class_frozen") in ("applied", "already applied")
    fast = ki._inside_class
    assert getattr(fast, "_diffus_patch", False)
    orig = fast.__wrapped__
    seen = []

    def probe(level):      # both called from this frame: the same frames above them
        seen.append((fast(level), orig(level), sys._getframe(level - 1).f_code.co_filename))
        return seen[-1][0]

    monkeypatch.setitem(sys.modules, "_diffus_probe", type(sys)("_diffus_probe"))
    sys.modules["_diffus_probe"].probe = probe
    (tmp_path / "_diffus_ic_mod.py").write_text(      # levels as in Taichi: 0 = _inside_class
        "from _diffus_probe import probe\n"
        "AT_IMPORT = probe(3), probe(2)\n"            # the importer's frame; the module's own
        "class Box:\n"
        "    IN_CLASS = probe(3)\n"                   # the frame running 'class Box:'
        "def nested():\n"
        "    return probe(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("_diffus_ic_mod")
    mod.nested()
    exec(compile("r = probe(2)", "<string>", "exec"), {"probe": probe})
    src = "class Boxed:\n    r = probe(3)\n"
    linecache.cache["<diffus-cached>"] = (len(src), None, src.splitlines(True), "<diffus-cached>")
    try:
        exec(compile(src, "<diffus-cached>", "exec"), {"probe": probe})
    finally:
        linecache.cache.pop("<diffus-cached>", None)
    # doctest serves its examples through a replaced linecache.getlines, not linecache.cache
    src2 = "class Boxed2:\n    r = probe(3)\n"
    stock = linecache.getlines

    def getlines(filename, module_globals=None):
        return src2.splitlines(True) if filename == "<doctest-like>" else stock(filename,
                                                                                module_globals)

    monkeypatch.setattr(linecache, "getlines", getlines)
    exec(compile(src2, "<doctest-like>", "exec"), {"probe": probe})
    monkeypatch.setattr(linecache, "getlines", stock)
    assert [f for f, _, _ in seen] == [False, False, True, False, False, True, True], seen
    assert all(f == o for f, o, _ in seen), seen
    files = [fn for _, _, fn in seen]
    assert files[0].startswith("<frozen") and files[1].endswith("_diffus_ic_mod.py"), files
    assert files[4] == "<string>" and files[5] == "<diffus-cached>", files
    importlib.reload(ki)                       # a reload is patched again by the import hook
    assert getattr(ki._inside_class, "_diffus_patch", False)
    code = ("import diffus_taichi, taichi, sys\n"
            "from diffus_taichi import taichi_patches as tp\n"
            "from taichi.lang import kernel_impl as ki\n"
            "print(tp.PATCHES.get('inside_class_frozen'), getattr(ki._inside_class, '_diffus_patch', False))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split()[-2:] == ["applied", "True"], out.stdout + out.stderr
    env = dict(os.environ, DIFFUS_NO_TAICHI_PATCH="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert "disabled" in out.stdout and out.stdout.split()[-1] == "False", out.stdout + out.stderr


def test_peak_memory_256_cube_within_budget():
    """Issue #7: peak memory for a 256^3 float32 NIfTI (head phantom), Simulator + one render
    on cpu, <= 2 x volume + 64 MiB over the baseline (fresh process, bench.measure_memory)."""
    from diffus_taichi import bench

    m = bench.measure_memory("cpu", 256, 256, 512, (512, 512))
    assert m["status"] == "ok", m["status"]
    assert m["passed"], (m["increase_bytes"] / 2 ** 20, m["budget_bytes"] / 2 ** 20,
                         m["stage_peak_over_baseline_bytes"])
