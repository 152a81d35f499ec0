"""Tracked sweep -> compounded 3-D ultrasound NIfTI (MRI affine, coverage), and dataset synthesis
(surface poses, determinism, shards partition the unsharded run)."""
import csv
import json

import numpy as np
import pytest

from diffus_taichi import synthesis
from diffus_taichi.pose import Pose
from diffus_taichi.probe import get_probe
from diffus_taichi.sweep import Compounder, freehand_path, read_path, to_uint8

SMALL = get_probe("craniotomy", n_lines=32, n_samples=64, image_px=(48, 48), depth_mm=40.0)


@pytest.fixture(scope="module")
def sim():
    from diffus_taichi import backend
    from diffus_taichi.simulator import Simulator

    backend.ensure("cpu", "f32")
    return Simulator("brain", probe=SMALL, arch="cpu")


def test_compounding_is_a_weighted_mean_in_the_frame_planes():
    """Constant frames compound to that constant; voxels far from every frame plane stay 0."""
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-40.0, -10.0, -5.0]
    shape = (80, 20, 60)
    around = Pose.look_at((0.0, 0.0, 0.0), (0, 0, 1), (1, 0, 0))   # fan in the x-z plane, y = 0
    poses = freehand_path(around, 5, 4.0, wobble_deg=0.0, drift_mm=0.0)
    comp = Compounder(SMALL, affine, shape)
    for p in poses:
        comp.add(np.full(SMALL.image_px, 0.4), p)
    us, w = comp.result()
    cov = us > 0
    assert cov.sum() > 500
    np.testing.assert_allclose(us[cov], 0.4, atol=1e-6)
    ijk = np.argwhere(cov)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    assert np.abs(world[:, 1]).max() <= 3.0 + 1e-9            # y in [-2, 2] mm +- one voxel
    assert world[:, 2].min() >= -1.0 and world[:, 2].max() <= SMALL.depth_mm + 1.0
    with pytest.raises(ValueError, match="frame shape"):
        comp.add(np.zeros((3, 3)), poses[0])
    with pytest.raises(ValueError, match="at least 2 frames"):
        freehand_path(around, 1)


def test_to_uint8_keeps_covered_dark_voxels_nonzero():
    u = to_uint8(np.array([0.0, 1e-4, 0.5, 1.0]))
    assert u.tolist() == [0, 1, 128, 255]


def test_sweep_cli_writes_us_with_mri_affine(tmp_path, sim):
    """`sweep --like MRI`: NIfTI on the MRI grid with its affine, covered voxels around the swept
    planes; resliced at a sweep pose, it resembles the frame rendered there."""
    import nibabel as nib

    from diffus_taichi.cli import main
    from diffus_taichi.remind import grid_affine, resample_channel, write_nifti
    from diffus_taichi.remind_compare import image_ncc
    from diffus_taichi.us_reslice import USReslicer
    from diffus_taichi.volume import load_nifti

    brain = sim.volume
    A, shape = grid_affine(brain.default_pose.probe_to_world([0, 0, 20.0]), 56, 1.0)
    A[:3, :3] = A[:3, :3] @ np.diag([1.0, 1.0, 1.0])
    mri_path = str(tmp_path / "mri.nii.gz")
    write_nifti(mri_path, resample_channel(brain, brain.display_channel(), A, shape), A)
    path = tmp_path / "path.csv"
    poses = freehand_path(brain.default_pose, 15, 8.0, seed=2)
    path.write_text("tx_mm,ty_mm,tz_mm,rx_deg,ry_deg,rz_deg\n" + "\n".join(
        p.to_string() for p in poses) + "\n")
    assert len(read_path(str(path))) == 15
    out = tmp_path / "us.nii.gz"
    rc = main(["sweep", "--path", str(path), "--like", mri_path, "--lines", "32", "--samples", "64",
               "--image-px", "48", "--depth-mm", "40", "--arch", "cpu", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    img = nib.load(str(out))
    np.testing.assert_allclose(img.affine, A, atol=1e-6)
    assert img.shape == shape and img.get_data_dtype() == np.uint8
    data = np.asarray(img.dataobj)
    assert 0.01 < (data > 0).mean() < 0.5
    # every covered voxel lies within the sweep's slab (elevation +-4 mm + wobble) of the probe
    ijk = np.argwhere(data > 0)
    world = ijk @ A[:3, :3].T + A[:3, 3]
    mid = poses[7]
    local = (world - mid.translation_mm) @ mid.rotation
    assert np.abs(local[:, 1]).max() < 4.0 + 2.5
    face_z = SMALL.line_geometry()[0][:, 2].min()            # curved face: -1.8 mm at the edges
    assert local[:, 2].min() > face_z - 2.0 and local[:, 2].max() < 40.0 + 12.0
    # resliced at a sweep pose it correlates with the frame rendered there
    us = load_nifti(str(out))
    rs = USReslicer(us, SMALL)
    m = rs.mask(mid)
    assert m.sum() > 0.5 * SMALL.scan_grid()[2].sum()
    assert image_ncc(rs.reslice(mid), sim.render(mid), m) > 0.4
    # bad inputs
    assert main(["sweep", "--like", str(tmp_path / "none.nii.gz"), "--out", str(out)]) == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n")
    with pytest.raises(ValueError, match="line 1"):
        read_path(str(bad))


# --- synthesis ----------------------------------------------------------------------------------
def _cfg(n=6, seed=5):
    return synthesis.SynthesisConfig(volume="brain", n=n, seed=seed, probe="craniotomy",
                                     probe_overrides=dict(n_lines=32, n_samples=64,
                                                          image_px=(48, 48), depth_mm=40.0),
                                     batch=4)


@pytest.fixture(scope="module")
def synth(sim):
    return synthesis.Synthesizer(_cfg(), sim=sim)


def _read(out, suffix=""):
    frames = np.load(out / f"frames{suffix}.npy")
    with open(out / f"poses{suffix}.csv") as fh:
        rows = list(csv.reader(fh))
    return frames, rows


def test_poses_on_the_surface_pointing_inwards(synth):
    s = synth.sampler
    rg = s.region
    for i in range(12):
        p = s.pose(5, i)
        inward = s.centre - p.translation_mm
        inward /= np.linalg.norm(inward)
        axial = p.rotation[:, 2]
        # the probe looks inwards: within the tilt of the inward radial direction
        assert np.degrees(np.arccos(np.clip(axial @ inward, -1, 1))) < rg.tilt_deg + 1.0
        # the face sits just outside the content (standoff) and the content starts right below it
        pts = p.translation_mm + np.linspace(0.0, 3.0, 13)[:, None] * inward
        ijk = np.rint(s.volume.world_to_index(pts)).astype(int)
        assert s.mask[tuple(ijk[-1])] and not s.mask[tuple(ijk[0])]
        # inside the cone around the region direction (the vertex, +z)
        radial = -inward
        assert np.degrees(np.arccos(radial @ s.axis)) < rg.cone_deg + 1.0
    np.testing.assert_array_equal(s.pose(5, 3).as_vector(), s.pose(5, 3).as_vector())
    assert not np.allclose(s.pose(5, 3).as_vector(), s.pose(6, 3).as_vector())


def test_synthesis_deterministic_and_shards_partition(tmp_path, synth, sim):
    a, b = tmp_path / "a", tmp_path / "b"
    summ = synth.run(str(a), progress=False)
    assert summ["frames"] == 6 and summ["frames_per_s"] > 0
    synthesis.Synthesizer(_cfg(), sim=sim).run(str(b), progress=False)   # fresh sampler
    fa, ra = _read(a)
    fb, rb = _read(b)
    assert fa.shape == (6, 48, 48) and fa.dtype == np.uint8 and fa.max() > 50
    np.testing.assert_array_equal(fa, fb)
    assert ra == rb and ra[0] == synthesis.CSV_HEADER
    assert [int(r[0]) for r in ra[1:]] == list(range(6))
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["config"]["seed"] == 5 and cfg["config"]["n"] == 6
    for i in range(6):                       # the PNG is the array frame
        from PIL import Image
        np.testing.assert_array_equal(np.asarray(Image.open(a / "images" / f"{i:06d}.png")), fa[i])
    # frames differ from each other (poses and speckle)
    assert len({fa[i].tobytes() for i in range(6)}) == 6
    # shards: 3 parts, union == unsharded, disjoint, PNG names = global indices
    sh = tmp_path / "sh"
    parts = []
    for k in range(3):
        synth.run(str(sh), k, 3, progress=False)
        parts.append(_read(sh, f"-shard-{k:04d}-of-0003"))
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), fa)
    assert [r for p in parts for r in p[1][1:]] == ra[1:]
    assert sorted(f.name for f in (sh / "images").iterdir()) == \
        sorted(f.name for f in (a / "images").iterdir())
    for f in (a / "images").iterdir():
        assert (sh / "images" / f.name).read_bytes() == f.read_bytes()
    synthesis.merge_shards(str(sh), 3)
    fm, rm = _read(sh)
    np.testing.assert_array_equal(fm, fa)
    assert rm == ra
    with pytest.raises(FileNotFoundError, match="shard 0/4 output missing"):
        synthesis.merge_shards(str(sh), 4)


def test_batched_synthesis_equals_frame_by_frame(tmp_path, synth, sim):
    """A Simulator with batch=4 (6 frames: a full batch and a padded one, per-frame speckle
    seeds) writes exactly the frames and rows of the one-frame-per-launch Simulator."""
    from diffus_taichi.simulator import Simulator

    a, b = tmp_path / "a", tmp_path / "b"
    synth.run(str(a), progress=False)
    bsim = Simulator("brain", probe=sim.probe, arch=sim.arch, batch=4, share_volume_with=sim)
    synthesis.Synthesizer(_cfg(), sim=bsim).run(str(b), progress=False)
    fa, ra = _read(a)
    fb, rb = _read(b)
    assert np.abs(fa.astype(int) - fb.astype(int)).max() <= 1     # f32 rounding at most 1 grey level
    assert (fa != fb).mean() < 1e-3
    assert ra == rb


def test_shard_ranges_and_bad_input():
    for n in (0, 1, 7, 100):
        for m in (1, 2, 3, 8):
            got = [i for k in range(m) for i in synthesis.shard_range(n, k, m)]
            assert got == list(range(n))
    assert synthesis.parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "-1/3", "a/b", "3"):
        with pytest.raises(ValueError, match="K/M"):
            synthesis.parse_shard(bad)
    with pytest.raises(ValueError, match="tilt_deg"):
        synthesis.PoseRegion(tilt_deg=95).validate()
    with pytest.raises(ValueError, match="positive integer"):
        synthesis.SynthesisConfig(n=0)


def test_synthesize_cli_shard(tmp_path):
    from diffus_taichi.cli import main

    out = tmp_path / "ds"
    args = ["synthesize", "--n", "4", "--out", str(out), "--seed", "3", "--lines", "32",
            "--samples", "64", "--image-px", "48", "--depth-mm", "40", "--arch", "cpu",
            "--no-progress", "--tilt-deg", "10"]
    assert main(args + ["--shard", "1/2"]) == 0
    frames, rows = _read(out, "-shard-0001-of-0002")
    assert frames.shape == (2, 48, 48) and [r[0] for r in rows[1:]] == ["2", "3"]
    assert sorted(f.name for f in (out / "images").iterdir()) == ["000002.png", "000003.png"]
    cfg = json.loads((out / "config-shard-0001-of-0002.json").read_text())
    assert cfg["config"]["region"]["tilt_deg"] == 10 and cfg["run"]["shard"] == 1
    assert main(args + ["--shard", "2/2"]) == 2
