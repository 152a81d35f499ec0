"""Pose search (registration.py): chart, target handling, convergence, CLI ``search``."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from diffus_taichi.pose import Pose
from diffus_taichi.probe import get_probe
from diffus_taichi.registration import (Level, PoseSearch, _Frame, default_init_pose,
                                        load_target_image, resample_fan)

SMALL = get_probe("craniotomy", n_lines=64, n_samples=128, image_px=128)
# a phantom pose whose fan cuts a lateral ventricle obliquely (structure in every direction)
PHANTOM_POSE = Pose.look_at((-4.0, 8.0, 66.0), (0.1, -0.35, -1.0), (1, 0.4, 0))


def test_resample_fan_identity():
    rng = np.random.default_rng(0)
    img = rng.random(SMALL.image_px)
    out = resample_fan(img, SMALL, SMALL)
    assert out.shape == img.shape
    np.testing.assert_allclose(out, img, atol=1e-9)
    half = SMALL.with_(n_lines=32, n_samples=64, image_px=(64, 64))
    assert resample_fan(img, SMALL, half).shape == (64, 64)


def test_chart_identity_and_jacobian():
    ref = Pose.from_degrees(10, -20, 30, 100, -120, 40)       # |rotation| near 180 deg
    fr = _Frame(ref, 30.0)
    v, J = fr.vec_and_jac(np.zeros(6))
    assert ref.error_to(Pose.from_vector(v))[0] < 1e-9
    assert ref.error_to(Pose.from_vector(v))[1] < 1e-7
    # translation columns: the probe axes in world; a pure rotation about the pivot keeps it fixed
    np.testing.assert_allclose(J[:3, :3], ref.rotation, atol=1e-6)
    x = np.array([0, 0, 0, 3.0, -2.0, 5.0])
    piv = np.array([0.0, 0.0, 30.0])
    np.testing.assert_allclose(fr.pose(x).probe_to_world(piv), ref.probe_to_world(piv), atol=1e-9)
    t, r = ref.error_to(fr.pose(x))
    assert abs(r - math.sqrt(9 + 4 + 25)) < 1e-6


def test_default_init_pose_offset():
    p = Pose.from_degrees(1, 2, 3, 10, 20, 30)
    t, r = default_init_pose(p).error_to(p)
    assert abs(t - 5.0) < 1e-9 and abs(r - 5.0) < 1e-9


def test_load_target_image_formats(tmp_path):
    import matplotlib.image as mpimg

    img = np.linspace(0, 1, 12 * 10).reshape(12, 10)
    mpimg.imsave(tmp_path / "t.png", img, cmap="gray", vmin=0, vmax=1)
    g = load_target_image(str(tmp_path / "t.png"))
    assert g.shape == (12, 10) and g.min() >= 0 and g.max() <= 1
    assert abs(g[-1, -1] - 1) < 0.02 and g[0, 0] < 0.02
    np.savez(tmp_path / "t.npz", fan=img)
    np.testing.assert_array_equal(load_target_image(str(tmp_path / "t.npz")), img)
    np.savez(tmp_path / "bad.npz", other=img)
    with pytest.raises(ValueError, match="no array 'fan'"):
        load_target_image(str(tmp_path / "bad.npz"))
    np.save(tmp_path / "three.npy", np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="2-D"):
        load_target_image(str(tmp_path / "three.npy"))
    np.save(tmp_path / "big.npy", img * 255)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_target_image(str(tmp_path / "big.npy"))
    with pytest.raises(FileNotFoundError):
        load_target_image(str(tmp_path / "missing.npy"))


@pytest.fixture(scope="module")
def phantom_search(phantom_volume):
    from diffus_taichi import backend

    backend.ensure("cpu", "f32")
    levels = [Level(0.5, 1.0, 60, "mean", 1.0), Level(1.0, 1.0, 60, "mean", 0.3)]
    return PoseSearch(phantom_volume, SMALL, levels=levels, n_starts=1, arch="cpu")


def test_phantom_search_converges(phantom_search):
    """Matched target (rendered by the search's own 'mean' model) from 3 mm / 3 deg away."""
    ps = phantom_search
    ps.render_sim.settings.speckle = "mean"
    target = ps.render(PHANTOM_POSE)
    ps.render_sim.settings.speckle = True
    d = np.array([1.0, -1.0, 1.0]) / math.sqrt(3)
    init = PHANTOM_POSE.moved(3 * d, np.radians(3) * d[::-1])
    assert abs(init.error_to(PHANTOM_POSE)[0] - 3) < 1e-9
    res = ps.run(target, init, true_pose=PHANTOM_POSE, progress=False)
    et, er = res.errors()
    assert et < 0.5 and er < 0.5, (et, er)
    assert res.iterations == len(res.loss_history) > 0
    assert res.loss_history[-1] < res.loss_history[0]
    d = res.to_dict()
    assert d["translation_error_mm"] == et and "pose_matrix" in d
    with pytest.raises(ValueError, match="shape"):
        ps.run(np.zeros((10, 10)), init)


def test_set_target_again(phantom_search):
    """After re-targeting (loss fields reused), every level's loss is the NCC of the current
    target, computed here in NumPy."""
    from diffus_taichi.losses import blur_np

    ps = phantom_search
    p = PHANTOM_POSE
    q = p.moved((1.0, 0.5, 0.0))
    ps.set_target(ps.render(p.moved((2.0, 0, 0))))
    t2 = ps.render(p)
    ps.set_target(t2)
    for lv, sim in zip(ps.levels, ps.sims):
        tgt = t2 if sim.probe == ps.probe else resample_fan(t2, ps.probe, sim.probe)
        m = sim.fan_mask()
        a = blur_np(sim.render(q).astype(np.float64), lv.blur_px)[m]
        b = blur_np(tgt, lv.blur_px)[m]
        a, b = a - a.mean(), b - b.mean()
        ncc = (a @ b) / np.sqrt((a @ a) * (b @ b))
        assert abs(sim.loss(q) - (1 - ncc)) < 1e-4


def _cli(args, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "diffus_taichi", "search", *args],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


def test_cli_search_json_and_figure(tmp_path):
    pose = PHANTOM_POSE.to_string()
    r = _cli(["--volume", "phantom", "--lines", "64", "--samples", "128", "--image-px", "128",
              "--arch", "cpu", f"--target-pose={pose}", "--starts", "2", "--json", "out.json",
              "--figure", "out.png"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads((tmp_path / "out.json").read_text())
    for k in ("pose", "loss_history", "iterations", "seconds", "translation_error_mm",
              "rotation_error_deg", "init_pose", "true_pose"):
        assert k in d, k
    assert d["iterations"] == len(d["loss_history"]) > 0
    assert abs(d["initial_translation_error_mm"] - 5) < 1e-6
    assert (tmp_path / "out.png").stat().st_size > 10000
    assert Pose.parse(r.stdout.strip().splitlines()[-1])          # final pose on stdout
    assert "pose search [" in r.stderr                             # progress bar


def test_cli_target_image_wrong_shape(tmp_path):
    np.save(tmp_path / "t.npy", np.zeros((50, 60)))
    r = _cli(["--volume", "phantom", "--lines", "64", "--samples", "128", "--image-px", "128",
              "--target-image", "t.npy", "--init-pose", "0,0,60,180,0,0"], tmp_path)
    assert r.returncode == 2
    assert "shape (50, 60)" in r.stderr and "(128, 128)" in r.stderr
    r = _cli(["--volume", "phantom", "--target-image", "t.npy"], tmp_path)
    assert r.returncode == 2 and "--init-pose is required" in r.stderr
    r = _cli(["--volume", "phantom", "--target-image", "missing.png", "--init-pose",
              "0,0,60,180,0,0"], tmp_path)
    assert r.returncode == 2 and "not found" in r.stderr


def test_sample_starts_homes_in():
    """The loss-only pre-screen (cross-entropy rounds) finds the basin of a bowl whose minimum
    lies in a corner of the start box, far from every axis-aligned start."""
    ps = PoseSearch.__new__(PoseSearch)          # sample_starts needs only these settings
    ps.sample_points, ps.sample_rounds, ps.sample_box = 96, 3, 1.35
    x0 = np.array([10.0, -11.0, 8.0, -9.0, 10.0, -8.0])
    starts = PoseSearch.start_points(16, 9.0, 9.0, np.random.default_rng(0))
    chosen, n = ps.sample_starts(lambda x: float(np.sum((x - x0) ** 2)), starts, 8, 9.0, 9.0,
                                 np.random.default_rng(1))
    assert n == 96 * 3 and len(chosen) == 8
    assert np.all(chosen[0] == 0)                               # the initial pose is kept
    assert np.abs(chosen[1] - x0).max() < 4.0, chosen[1]       # from >= 8 per axis
    assert min(np.abs(c - x0).max() for c in starts) > 8.0
    with pytest.raises(ValueError, match="attempts"):
        PoseSearch("phantom", SMALL, attempts=0)


def test_match_loss_predicts_loss_at_truth(phantom_search):
    """The restart rule's yardstick: at the true pose, the loss against a coherent target is
    close to match_loss (a fresh coherent render there); at a wrong pose it is far above it."""
    ps = phantom_search
    target = ps.render(PHANTOM_POSE)                            # coherent speckle, seed 1
    ps.set_target(target)
    sim = ps.sims[-1]
    at_truth, floor = sim.loss(PHANTOM_POSE), ps.match_loss(PHANTOM_POSE)
    assert abs(sim.loss(PHANTOM_POSE) - at_truth) < 1e-9      # target restored afterwards
    assert 0 < floor and at_truth < ps.restart_ratio * floor, (at_truth, floor)
    wrong = PHANTOM_POSE.moved((0.0, 6.0, 0.0), np.radians((8.0, 0.0, 0.0)))
    assert sim.loss(wrong) > 2 * ps.match_loss(wrong), (sim.loss(wrong), ps.match_loss(wrong))
