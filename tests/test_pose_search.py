"""Pose search: the CLI writes its JSON and figure, improves on the initial pose of a synthetic
target, and reports bad target files clearly. (Success-rate numbers: benchmarks/bench_pose_search.py.)"""
import json
import subprocess
import sys

import numpy as np

from diffus_taichi import get_probe
from diffus_taichi.registration import resample_fan


def test_resample_fan_identity():
    p = get_probe("craniotomy", n_lines=32, n_samples=64, image_px=(48, 48))
    img = np.random.default_rng(0).random((48, 48))
    assert np.allclose(resample_fan(img, p, p), img)


def test_cli_search_improves_pose_and_writes_outputs(tmp_path):
    from diffus_taichi import load_volume

    true = load_volume("brain").default_pose
    js, fig = tmp_path / "s.json", tmp_path / "s.png"
    cmd = [sys.executable, "-m", "diffus_taichi", "search", "--volume", "brain", "--arch", "cpu",
           "--lines", "96", "--samples", "192", "--image-px", "160", "--target-pose",
           true.to_string(), "--starts", "2", "--json", str(js), "--figure", str(fig),
           "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    d = json.loads(js.read_text())
    for key in ("pose", "loss_history", "iterations", "seconds", "translation_error_mm",
                "rotation_error_deg"):
        assert key in d
    # the default start is 5 mm / 5 deg away; the search must get clearly closer in translation
    assert d["translation_error_mm"] < 2.0
    assert d["rotation_error_deg"] < 5.0
    assert min(d["loss_history"]) < d["loss_history"][0]
    assert fig.stat().st_size > 10000


def test_cli_search_bad_target_image(tmp_path):
    bad = tmp_path / "t.npy"
    np.save(bad, np.zeros((10, 10)))
    res = subprocess.run([sys.executable, "-m", "diffus_taichi", "search", "--volume", "phantom",
                          "--arch", "cpu", "--lines", "32", "--samples", "64", "--image-px", "64",
                          "--target-image", str(bad), "--init-pose", "0,0,66,180,0,0",
                          "--no-progress"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and "shape" in res.stderr
