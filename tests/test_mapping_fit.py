"""Mapping fit (issue 3): learn a hidden transfer function from synthetic (pose, image) pairs by
backpropagation through the renderer; pairs I/O; projection; the fit-mapping CLI."""
import json

import numpy as np
import pytest

from diffus_taichi import get_probe, load_volume
from diffus_taichi import mapping_fit as mf
from diffus_taichi.acoustics import T1_TRANSFER_KNOTS, AcousticMapping

# small and fast: 48 lines x 96 samples, 96 px fan image
PROBE = get_probe("craniotomy", n_lines=48, n_samples=96, image_px=(96, 96))
N_TRAIN, N_HELD = 6, 3


@pytest.fixture(scope="module")
def brain():
    return load_volume("brain")


@pytest.fixture(scope="module")
def fitted(brain):
    from diffus_taichi import backend

    backend.ensure("cpu", "f32")
    hidden = mf.perturbed_knots(T1_TRANSFER_KNOTS, pct=3.0, seed=0)
    poses = mf.random_poses(brain, N_TRAIN + N_HELD, seed=0)
    settings = {"speckle": "coherent", "seed": 1}
    # one Simulator (with gradient fields) renders the targets, fits and evaluates: one JIT
    renderer = mf.PairRenderer(brain, PROBE, poses, AcousticMapping("transfer", knots=hidden),
                               settings, arch="cpu", requires_grad=True)
    pairs = mf.Pairs(poses, renderer.render(), probe=PROBE, settings=settings)
    train, held = pairs.split(N_TRAIN)
    mapping, hist = mf.fit_mapping(brain, train, kind="transfer", iters=40, lr=0.01, arch="cpu",
                                   progress=False, renderer=renderer)
    return dict(hidden=hidden, renderer=renderer, train=train, held=held, mapping=mapping, hist=hist)


def test_fit_recovers_hidden_transfer_function(fitted):
    hidden, mapping, hist = fitted["hidden"], fitted["mapping"], fitted["hist"]
    held, renderer = fitted["held"], fitted["renderer"]
    mask = PROBE.scan_grid()[2]
    images = renderer.render(mapping, held.poses)
    ncc = [mf.image_ncc(a, b, mask) for a, b in zip(images, held.images)]
    assert min(ncc) >= 0.98
    # the specular component (speckle off) is what the impedance controls: fitted must match
    # it far better than the initial (default) knots do
    spec = dict(speckle="off", dynamic_range_db=120.0)         # nothing clips
    spec_true = renderer.render(AcousticMapping("transfer", knots=hidden), held.poses, **spec)
    spec_fit = renderer.render(mapping, held.poses, **spec)
    spec_init = renderer.render(AcousticMapping("transfer"), held.poses, **spec)
    s_fit = min(mf.image_ncc(a, b, mask) for a, b in zip(spec_fit, spec_true))
    s_init = min(mf.image_ncc(a, b, mask) for a, b in zip(spec_init, spec_true))
    assert s_fit >= 0.995 and s_init < 0.95, (s_fit, s_init)
    assert hist["final_loss"] < 0.01 * hist["loss"][0]

    cmp_ = mf.compare_params(mapping.knots, hidden, T1_TRANSFER_KNOTS, hist["support"])
    con = cmp_["constrained"]
    assert con.sum() >= 3 and not con[0]           # the intensity-0 knot is barely sampled
    assert np.all(cmp_["rel"][con, 0] <= 0.05)
    # up to the common factor that reflection-only images cannot observe: far tighter
    assert np.all(cmp_["rel_impedance_aligned"][con] <= 0.003)
    assert np.all(cmp_["rel_impedance_aligned_init"][con].max() > 0.005)
    # only impedance was fitted; constraints hold
    np.testing.assert_array_equal(mapping.knots[:, 1:], T1_TRANSFER_KNOTS[:, 1:])
    assert np.all(np.diff(mapping.knots[:, 0]) >= 0) and mapping.knots[:, 0].min() >= mf.MIN_IMPEDANCE


def test_crop_renders_identically(brain, fitted):
    cropped = fitted["renderer"]                   # cropped to the fans of its poses
    poses = fitted["held"].poses
    m = AcousticMapping("transfer")
    full = mf.PairRenderer(brain, PROBE, poses, m, {"seed": 1}, arch="cpu", crop=False)
    assert full.sim.volume.shape == brain.shape and cropped.sim.volume.shape < brain.shape
    np.testing.assert_allclose(cropped.render(m, poses), full.render(), atol=1e-5)
    with pytest.raises(ValueError, match="outside the region"):
        cropped.render(poses=poses[:1] + [30, 0, 0, 0, 0, 0])


def test_projection_and_helpers():
    y = np.array([1.0, 3.0, 2.0, 2.0, 5.0, 4.0])
    iso = mf.isotonic(y)
    assert np.all(np.diff(iso) >= 0)
    np.testing.assert_allclose(iso, [1.0, 7 / 3, 7 / 3, 7 / 3, 4.5, 4.5])
    P = np.array([[1.6, -0.1, 0.1], [1.5, 0.2, -1.0], [0.01, 0.3, 0.2]])
    Q = mf.project_params(P, "transfer")
    assert np.all(np.diff(Q[:, 0]) >= 0) and Q[:, 0].min() >= mf.MIN_IMPEDANCE and Q[:, 1:].min() >= 0
    w = np.array([0.0, 0.5, 0.5])
    Q = mf.project_params(P * [1, 0, 0] + [1.5, 0, 0], "transfer", ref_log_z=np.log(2.0), anchor_w=w)
    assert abs(w @ np.log(Q[:, 0]) - np.log(2.0)) < 1e-12
    k = mf.perturbed_knots(T1_TRANSFER_KNOTS, pct=3.0, seed=3)
    assert np.all(np.diff(k[:, 0]) >= 0) and k[0, 0] == T1_TRANSFER_KNOTS[0, 0]
    assert np.abs(k[:, 0] / T1_TRANSFER_KNOTS[:, 0] - 1).max() <= 0.03
    x = np.arange(16.0).reshape(4, 4)
    assert mf.image_ncc(x, 2 * x + 1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="fit must name"):
        mf.fit_mapping("brain", {"poses": np.zeros((1, 6)), "images": np.zeros((1, 96, 96))},
                       probe=PROBE, fit=("density",))


def test_pairs_roundtrip_and_render_npz_dir(tmp_path):
    probe = get_probe("linear", n_lines=16, n_samples=32, image_px=(24, 24))
    poses = np.arange(12.0).reshape(2, 6) * 0.01
    images = np.random.default_rng(0).random((2, 24, 24)).astype(np.float32)
    p = mf.Pairs(poses, images, probe=probe, settings={"seed": 3, "speckle": "coherent"},
                 true_mapping=AcousticMapping("transfer"))
    p.save(tmp_path / "pairs.npz")
    q = mf.load_pairs(str(tmp_path / "pairs.npz"))
    np.testing.assert_array_equal(q.poses, poses)
    np.testing.assert_array_equal(q.images, images)
    assert q.probe == probe and q.settings == {"seed": 3, "speckle": "coherent"}
    np.testing.assert_array_equal(q.true_mapping.knots, T1_TRANSFER_KNOTS)
    # a directory of `render --save-npz` files (probe saved as its repr)
    d = tmp_path / "renders"
    d.mkdir()
    for i in range(2):
        np.savez(d / f"r{i}.npz", fan=images[i], pose_vector_mm_rad=poses[i], probe=repr(probe),
                 echo_model="primary")
    r = mf.load_pairs(str(d))
    assert r.probe == probe and len(r) == 2 and r.settings["echo_model"] == "primary"
    with pytest.raises(ValueError, match="images are"):
        mf.Pairs(poses, images[:, :20], probe=probe)
    with pytest.raises(ValueError, match="2 poses but 1 images"):
        mf.Pairs(poses, images[:1])


def test_cli_fit_mapping_roundtrip(tmp_path, brain, cpu32):
    from diffus_taichi.cli import main

    out = tmp_path / "mapping.json"
    pairs = tmp_path / "pairs.npz"
    common = ["--volume", "brain", "--arch", "cpu", "--lines", "24", "--samples", "48",
              "--image-px", "48"]
    assert main(["fit-mapping", *common, "--synthetic", "3", "--holdout", "1", "--iters", "3",
                 "--pairs", str(pairs), "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["kind"] == "transfer" and np.array(d["knots"]).shape == (5, 3)
    assert len(mf.load_pairs(str(pairs))) == 4
    png = tmp_path / "fan.png"
    assert main(["render", *common, "--mapping", str(out), "--out", str(png)]) == 0
    assert png.exists() and png.stat().st_size > 0
    # the saved pairs are read back (probe and settings from the file); --iters 0 keeps init
    out2 = tmp_path / "mapping2.json"
    assert main(["fit-mapping", "--volume", "brain", "--arch", "cpu", "--pairs", str(pairs),
                 "--iters", "0", "--fit", "impedance,scattering", "--out", str(out2)]) == 0
    np.testing.assert_array_equal(AcousticMapping.load(str(out2)).knots, T1_TRANSFER_KNOTS)
    assert main(["fit-mapping", "--volume", "brain", "--arch", "cpu", "--out", str(out2)]) == 2
