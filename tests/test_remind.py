"""ReMIND2Reg workflow on synthetic cases in the real layout: loader (folder, JSON, missing T2,
broken file, the real index file), ultrasound-volume reslicer geometry, compare figure, search."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from diffus_taichi import remind
from diffus_taichi.pose import Pose
from diffus_taichi.probe import get_probe
from diffus_taichi.volume import Volume

REAL_INDEX = Path(__file__).resolve().parents[1] / ".." / "shared" / "remind2reg" / "ReMIND2Reg_dataset.json"
PROBE = get_probe("craniotomy", n_lines=64, n_samples=128, image_px=(128, 128), depth_mm=40.0)
PROBE_ARGS = ["--lines", "64", "--samples", "128", "--image-px", "128", "--depth-mm", "40",
              "--arch", "cpu"]


@pytest.fixture(scope="module")
def sim():
    from diffus_taichi import backend
    from diffus_taichi.simulator import Simulator

    backend.ensure("cpu", "f32")
    return Simulator("brain", probe=PROBE, arch="cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, sim):
    """Two cases: 0000 (US, ceT1, T2) and 0003 (US, ceT1; no T2), with the dataset JSON."""
    root = tmp_path_factory.mktemp("remind")
    remind.make_synthetic_case(str(root), "0000", size_mm=64, spacing_mm=1.0, sim=sim,
                               sweep_frames=25, sweep_length_mm=12.0)
    remind.make_synthetic_case(str(root), "0003", size_mm=64, spacing_mm=1.0, sim=sim,
                               with_t2=False, sweep_frames=9, sweep_length_mm=6.0, seed=3)
    remind.write_dataset_json(str(root), {"0000": ("0000", "0001", "0002"),
                                          "0003": ("0000", "0001")}, val_ids=("0003",))
    return root


def test_loader_folder_json_and_scan(dataset):
    for path in (dataset, dataset / "ReMIND2Reg_dataset.json", dataset / "imagesTr"):
        ds = remind.RemindDataset.open(path)
        assert ds.case_ids() == ["0000", "0003"]
        assert ds.counts() == {"0000": 2, "0001": 2, "0002": 1}
    ds = remind.RemindDataset.open(dataset)
    assert ds.index is not None and ds.pairs == [("0000", "0000", "0001"), ("0000", "0000", "0002")]
    assert ds.registration_val == [("0003", "0000", "0001")]
    case = ds.case(0)                 # ints and unpadded ids are accepted
    assert case.case_id == "0000" and case.mri_modalities == ("0001", "0002")
    us, mri, t2 = case.load_us(), case.load_mri("ceT1"), case.load_mri("t2")
    for v in (us, mri, t2):           # all in MRI space: same grid and affine
        assert v.shape == (64, 64, 64)
        np.testing.assert_allclose(v.affine, mri.affine)
    assert us.meta["intensity_scale"] == "value / 255"
    cov = us.display_channel() > 0
    assert 0.01 < cov.mean() < 0.9    # a sweep covers part of the grid
    # T2 contrast: CSF brighter than white matter, the reverse of T1
    assert np.corrcoef(mri.display_channel().ravel(), t2.display_channel().ravel())[0, 1] < 0.5
    with pytest.raises(ValueError, match="has 2 cases"):
        ds.case()
    with pytest.raises(ValueError, match="'0042' is not in dataset"):
        ds.case("0042")
    # one image file selects its case
    one = remind.open_case(dataset / "imagesTr" / "ReMIND2Reg_0003_0000.nii.gz")
    assert one.case_id == "0003"


def test_case_without_t2_gives_clear_message(dataset):
    case = remind.open_case(dataset, "0003")
    assert case.mri_modalities == ("0001",)
    assert case.load_mri().meta["modality"] == "0001"         # default: ceT1
    with pytest.raises(ValueError, match=r"case 0003 has no T2 MRI \(0002\); it has: 3-D ultrasound"):
        case.load_mri("T2")
    with pytest.raises(ValueError, match="unknown ReMIND2Reg modality"):
        case.load("flair")
    with pytest.raises(ValueError, match="not an MRI modality"):
        case.load_mri("us")


def test_broken_and_missing_files(dataset, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(dataset, root)
    f = root / "imagesTr" / "ReMIND2Reg_0000_0001.nii.gz"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])                     # truncated gzip
    case = remind.open_case(root, "0000")
    with pytest.raises(ValueError, match=r"case 0000, ceT1 MRI: .*corrupt or truncated"):
        case.load_mri("ceT1")
    os.remove(root / "imagesTr" / "ReMIND2Reg_0000_0002.nii.gz")
    with pytest.raises(FileNotFoundError, match="T2 MRI file .* is listed but missing on disk"):
        remind.open_case(root, "0000").load_mri("T2")
    (root / "ReMIND2Reg_dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read ReMIND2Reg dataset JSON"):
        remind.RemindDataset.open(root)
    (root / "ReMIND2Reg_dataset.json").write_text(json.dumps({"training": [{"image": "x.nii.gz"}]}))
    with pytest.raises(ValueError, match="is not ReMIND2Reg_<case>_<modality>"):
        remind.RemindDataset.open(root)
    with pytest.raises(FileNotFoundError, match="ReMIND2Reg dataset not found"):
        remind.RemindDataset.open(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no ReMIND2Reg_<case>_<modality>.nii.gz images"):
        remind.RemindDataset.open(empty)


@pytest.mark.skipif(not REAL_INDEX.exists(), reason="real ReMIND2Reg index not present")
def test_real_dataset_index():
    ds = remind.RemindDataset.open(REAL_INDEX)
    assert ds.counts() == {"0000": 103, "0001": 97, "0002": 66}
    assert len(ds.pairs) == 155 and len(ds.registration_val) == 8
    assert all(fixed == "0000" and moving in ("0001", "0002")
               for _, fixed, moving in ds.pairs + ds.registration_val)
    no_t2 = [c for c in ds if c.has("us") and not c.has("T2")]
    assert no_t2
    with pytest.raises(ValueError, match="has no T2 MRI"):
        no_t2[0].load_mri("T2")
    # the images are not shipped here: loading names the missing file
    with pytest.raises(FileNotFoundError, match="listed but missing on disk"):
        ds.case(ds.case_ids()[0]).load_us()


def test_reslicer_sphere_at_predicted_pixel():
    """A bright sphere in an oblique, anisotropic US volume appears at the fan pixel the probe
    geometry predicts; uncovered (0) voxels are outside the coverage mask."""
    from diffus_taichi.pose import rotvec_to_matrix
    from diffus_taichi.us_reslice import USReslicer

    sp = np.array([0.5, 0.7, 0.6])
    R = rotvec_to_matrix(np.radians([10.0, -20.0, 30.0]))
    shape = (140, 110, 120)
    A = np.eye(4)
    A[:3, :3] = R * sp
    A[:3, 3] = -A[:3, :3] @ ((np.array(shape) - 1) / 2)
    pose = Pose.from_degrees(3.0, -2.0, -15.0, 20.0, 170.0, 5.0)
    x0, z0 = 6.0, 22.0
    centre = pose.probe_to_world([x0, 0.0, z0])
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    world = ijk @ A[:3, :3].T + A[:3, 3]
    r = np.linalg.norm(world - centre, axis=-1)
    data = np.where(r < 2.0, 1.0, 0.2).astype(np.float32)
    data[world[..., 0] < -20.0] = 0.0                     # not acquired there
    us = Volume(data, A, ("intensity",), name="sphere", default_pose=pose)
    rs = USReslicer(us, PROBE)
    img = rs.reslice(pose)
    x, z = PROBE.fan_axes_mm()
    bright = img > 0.6
    assert bright.sum() > 10
    rows, cols = np.nonzero(bright)
    w = img[bright]
    zc, xc = np.interp((rows * w).sum() / w.sum(), np.arange(len(z)), z), \
        np.interp((cols * w).sum() / w.sum(), np.arange(len(x)), x)
    px = PROBE.fan_pixel_mm()
    assert abs(xc - x0) < px and abs(zc - z0) < px        # within one pixel
    # the same on the scan lines: brightest sample where probe_to_line_coords says
    li, si = PROBE.probe_to_line_coords(x0, z0)
    L = rs.lines(pose)
    lr, ls = np.nonzero(L > 0.6)
    wl = L[L > 0.6]
    line_mm = (PROBE.radius_mm + z0) * np.radians(PROBE.fov_deg) / (PROBE.n_lines - 1)
    assert abs((lr * wl).sum() / wl.sum() - li) * line_mm < 0.5      # < 0.5 mm (voxels 0.5-0.7 mm)
    assert abs((ls * wl).sum() / wl.sum() - si) * PROBE.sample_spacing_mm < 0.5
    cov = rs.coverage(pose)
    inside = PROBE.scan_grid()[2]
    X, Z = np.meshgrid(x, z)
    wpts = pose.probe_to_world(np.stack([X, np.zeros_like(X), Z], -1))
    wx = wpts[..., 0]
    idx = us.world_to_index(wpts)
    in_vol = np.all((idx >= 1) & (idx <= np.array(shape) - 2), axis=-1)
    m = rs.mask(pose)
    assert not m[inside & (wx < -21.0)].any()             # uncovered region masked out
    sel = inside & in_vol & (wx > -19.0)
    assert sel.sum() > 1000 and m[sel].all()
    assert not m[inside & ~us.contains_world(wpts)].any()
    assert np.all(cov[~inside] == 0) and np.all(img[~inside] == 0)


def test_reslicer_matches_simulator_mri_reslice(sim):
    """Resliced through the scan lines + scan conversion, the MRI matches the simulator's direct
    per-pixel MRI reslice (same geometry)."""
    from diffus_taichi.remind_compare import image_ncc
    from diffus_taichi.us_reslice import USReslicer

    pose = sim.volume.default_pose.moved((2.0, 1.0, 0.0), np.radians([3.0, -4.0, 10.0]))
    rs = USReslicer(Volume(sim.volume.display_channel(), sim.volume.affine, ("intensity",)), PROBE)
    a, b = rs.reslice(pose), sim.reslice(pose)
    inside = PROBE.scan_grid()[2]
    assert image_ncc(a, b, inside) > 0.97
    assert np.abs(a - b)[inside].mean() < 0.03


def test_compare_cli_writes_figure(dataset, tmp_path):
    from diffus_taichi.cli import main

    png, js = tmp_path / "cmp.png", tmp_path / "cmp.json"
    rc = main(["compare", "--case", str(dataset), "--case-id", "0000", *PROBE_ARGS,
               "--out", str(png), "--json", str(js)])
    assert rc == 0 and png.stat().st_size > 20000
    m = json.loads(js.read_text())
    assert m["case"] == "0000" and m["coverage"] > 0.9
    # simulated from the case's T1 vs compounded sweep of the tissue model: related, not equal
    assert 0.1 < m["ncc"] < 0.99 and 0 < m["lc2_real_mri"] <= 1 and 0 < m["lc2_real_sim"] <= 1
    # missing case id among several -> clear error, exit code 2
    assert main(["compare", "--case", str(dataset), *PROBE_ARGS, "--out", str(png)]) == 2


def test_compare_metrics_peak_at_the_true_pose(dataset, sim):
    """NCC(simulated, real) is higher at the sweep pose than 4 mm / 6 deg away (tissue model)."""
    from diffus_taichi.remind_compare import compare_case
    from diffus_taichi.us_reslice import USReslicer

    case = remind.open_case(dataset, "0000")
    rs = USReslicer(case.load_us(), PROBE)
    true = case.sweep_poses()[12]
    at = compare_case(case, true, sim=sim, reslicer=rs)["ncc"]
    for d_t, d_r in (((4.0, 0, 0), (0, 0, 0)), ((0, 0, 4.0), (0, 0, 0)),
                     ((0, 0, 0), np.radians([6.0, 0, 0]))):
        off = compare_case(case, true.moved(d_t, d_r), sim=sim, reslicer=rs)["ncc"]
        assert at > off + 0.05, (d_t, d_r, at, off)


def test_search_case_cli_smoke(dataset, tmp_path):
    """`search --case`: runs against the real reslice (coverage-masked) and writes its JSON.
    (Convergence is measured in benchmarks/bench_remind_search.py: with this tiny probe and the
    case's T1 transfer mapping, which is not the acoustics that made the sweep, it need not.)"""
    from diffus_taichi.cli import main

    case = remind.open_case(dataset, "0000")
    true = case.sweep_poses()[12]
    init = true.moved((3.0, 0.0, 0.0))
    js = tmp_path / "search.json"
    rc = main(["search", "--case", str(dataset), "--case-id", "0000", *PROBE_ARGS,
               f"--pose={true.to_string()}", f"--init-pose={init.to_string()}", "--starts", "1",
               "--no-progress", "--json", str(js)])
    assert rc == 0
    d = json.loads(js.read_text())
    assert d["case"] == "0000" and d["coverage"] > 0.9
    assert np.isfinite(d["offset_from_reslice_pose_mm"]) and np.isfinite(d["loss"])
    assert d["reslice_pose"] == true.to_string() and d["init_pose"] == init.to_string()
    # a pose outside the acquired region is refused with a clear message
    far = true.moved((0.0, 30.0, 0.0))
    assert main(["search", "--case", str(dataset), "--case-id", "0000", *PROBE_ARGS,
                 f"--pose={far.to_string()}", "--no-progress"]) == 2


def test_default_pose_guessed_from_us_coverage(dataset, tmp_path):
    """Without sweep metadata (real data) the pose is guessed from where the ultrasound has
    data: near the sweep's probe, looking the same way (the twist is not determined)."""
    from diffus_taichi.remind_compare import case_pose

    root = tmp_path / "real_like"
    shutil.copytree(dataset, root, ignore=shutil.ignore_patterns(remind.SYNTHETIC_DIR))
    case = remind.open_case(root, "0000")
    assert case.sweep_poses() is None
    us, mri = case.load_us(), case.load_mri()
    guess = case_pose(case, mri, us)
    mid = remind.open_case(dataset, "0000").sweep_poses()[12]
    assert np.linalg.norm(np.subtract(guess.translation_mm, mid.translation_mm)) < 10.0
    assert np.degrees(np.arccos(guess.rotation[:, 2] @ mid.rotation[:, 2])) < 15.0
    with pytest.raises(ValueError, match="is empty"):
        remind.us_default_pose(Volume(np.zeros((4, 4, 4)), np.eye(4), ("intensity",)))
