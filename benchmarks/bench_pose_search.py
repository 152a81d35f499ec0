"""Pose-search benchmark on the built-in brain (issue 3, "pose search").

True poses: the probe on the brain surface (grey + white matter) reached from the brain's centre
along a random direction of the upper hemisphere (z > 0.3), looking inwards, with a random
lateral axis, then tilted by up to +-15 deg about a random axis of the probe face and spun by a
random angle about its axial axis; poses whose fan lies mostly (> 50 %) outside the brain are
rejected. A craniotomy (radius 30 mm: bone and scalp replaced by saline, as at the brain's
default pose) is cut under every true probe position (the probe sits 0.5 mm above the brain,
inside the skull: moved back by the initial perturbation, it would otherwise image nothing but
bone and its shadow). Initial pose: the true pose moved by uniform +-10 mm along each PROBE axis
and rotated by a uniform +-10 deg rotation vector per PROBE axis (about the centre of the probe
face), i.e. ``truth.moved(d_mm, d_rotvec)``. Success: translation error < 1 mm and rotation
error < 1 deg.

Cases (same true and initial poses for both):

* matched: target rendered by the same model (coherent speckle, same scatterer seed);
* mismatched: target rendered by a separate Simulator with another scatterer seed, every tissue
  impedance (tissue-table rows of the volume's tissues) scaled by an independent uniform factor in
  [0.9, 1.1], and additive Gaussian noise (sigma 0.05 on the [0, 1] image, clipped).

    python benchmarks/bench_pose_search.py --trials 20 --seed 0 --arch cpu --json out.json

Times exclude building the search (fields, volume upload) and the first JIT compilation (a
warm-up evaluation at every level runs before the trials); they include everything else in
``PoseSearch.run``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np

try:
    import diffus_taichi  # noqa: F401
except ImportError:       # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TISSUE_CONTENT = ("grey_matter", "white_matter")


def cpu_name() -> str:
    from diffus_taichi.bench import cpu_model

    return cpu_model()


def brain_content(vol) -> np.ndarray:
    return sum(vol.channel(n) for n in TISSUE_CONTENT)


def fan_inside_fraction(vol, content, probe, pose, threshold=0.3) -> float:
    """Fraction of fan sample points (33 lines x 49 depths) where ``content`` > threshold."""
    o, d = probe.line_geometry()
    sel = np.linspace(0, len(o) - 1, min(len(o), 33)).astype(int)
    depths = np.linspace(0, probe.depth_mm, 49)
    pts = o[sel, None, :] + depths[None, :, None] * d[sel, None, :]
    idx = np.rint(vol.world_to_index(pose.probe_to_world(pts.reshape(-1, 3)))).astype(int)
    ok = np.all((idx >= 0) & (idx < np.array(vol.shape)), axis=1)
    val = np.zeros(len(idx))
    val[ok] = content[tuple(idx[ok].T)]
    return float((val > threshold).mean())


def sample_true_pose(vol, content, probe, rng, max_tilt_deg=15.0, min_inside=0.5):
    from diffus_taichi.builtin_volumes import surface_pose

    while True:
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        if d[2] <= 0.3:
            continue
        hint = rng.normal(size=3)
        hint /= np.linalg.norm(hint)
        if abs(hint @ d) > 0.95:
            continue
        p = surface_pose(vol, d, hint, content=content, standoff_mm=0.5, threshold=0.3)
        spin = rng.uniform(-math.pi, math.pi)
        p = p.moved(d_rotvec_probe_rad=(0.0, 0.0, spin))
        phi = rng.uniform(0, 2 * math.pi)
        tilt = math.radians(rng.uniform(-max_tilt_deg, max_tilt_deg))
        p = p.moved(d_rotvec_probe_rad=(tilt * math.cos(phi), tilt * math.sin(phi), 0.0))
        if fan_inside_fraction(vol, content, probe, p) >= min_inside:
            return p


def perturb(pose, rng, mm=10.0, deg=10.0):
    return pose.moved(rng.uniform(-mm, mm, 3), np.radians(rng.uniform(-deg, deg, 3)))


def mismatched_target(tsim, truth, rng, seed, imp_pct=10.0, noise=0.05):
    from diffus_taichi.acoustics import AcousticMapping

    base = AcousticMapping("tissue")
    over = {}
    for name in tsim.volume.tissue_names:
        z, a, s = base.tissue_props(name)
        over[name] = (z * rng.uniform(1 - imp_pct / 100, 1 + imp_pct / 100), a, s)
    tsim.upload_mapping(AcousticMapping("tissue", overrides=over))
    tsim.settings.seed = int(seed)
    img = tsim.render(truth).astype(np.float64)
    return np.clip(img + rng.normal(0.0, noise, img.shape), 0.0, 1.0)


def pct(v, q):
    return float(np.percentile(v, q)) if len(v) else float("nan")


def summarize(rows):
    ok = [r["success"] for r in rows]
    t = [r["seconds"] for r in rows]
    it = [r["iterations"] for r in rows]
    return {"n": len(rows), "success_rate": float(np.mean(ok)) if rows else float("nan"),
            "median_s": pct(t, 50), "p90_s": pct(t, 90), "median_iters": pct(it, 50),
            "p90_iters": pct(it, 90),
            "restarted": int(sum(r.get("attempts", 1) > 1 for r in rows)),
            "median_err_mm": pct([r["err_mm"] for r in rows], 50),
            "median_err_deg": pct([r["err_deg"] for r in rows], 50)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", default="cpu")
    ap.add_argument("--loss", default=None, help="loss (default: PoseSearch's default)")
    ap.add_argument("--optimizer", default="adam", choices=["adam", "lbfgs"])
    ap.add_argument("--starts", type=int, default=None,
                    help="multi-start count (default: PoseSearch's)")
    ap.add_argument("--cases", default="matched,mismatched")
    ap.add_argument("--init-mm", type=float, default=10.0)
    ap.add_argument("--init-deg", type=float, default=10.0)
    ap.add_argument("--probe", default="craniotomy")
    ap.add_argument("--craniotomy-mm", type=float, default=30.0,
                    help="radius of the craniotomy cut under every true probe position [30]")
    ap.add_argument("--json", default=None)
    ap.add_argument("--progress", action="store_true", help="per-search progress bar on stderr")
    a = ap.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING)
    from diffus_taichi.registration import PoseSearch
    from diffus_taichi.simulator import Simulator

    cases = [c for c in a.cases.split(",") if c]
    for c in cases:
        if c not in ("matched", "mismatched"):
            ap.error(f"unknown case {c!r}")
    from diffus_taichi.builtin_volumes import cut_craniotomy
    from diffus_taichi.probe import get_probe
    from diffus_taichi.volume import load_volume

    vol = load_volume("brain")
    probe = get_probe(a.probe)
    content = brain_content(vol)
    rng = np.random.default_rng(a.seed)
    trials = []
    for i in range(a.trials):
        truth = sample_true_pose(vol, content, probe, rng)
        init = perturb(truth, rng, a.init_mm, a.init_deg)
        trials.append((truth, init, int(rng.integers(1 << 30))))
    # intra-operative setting: a craniotomy (saline instead of bone and scalp) under every true
    # probe position, as at the brain's default pose; through intact bone, a probe moved back by
    # the initial perturbation would see nothing but the bone's shadow.
    for truth, _, _ in trials:
        cut_craniotomy(vol, truth.translation_mm, a.craniotomy_mm)
    t0 = time.perf_counter()
    kw = {} if a.loss is None else {"loss": a.loss}
    ps = PoseSearch(vol, probe, optimizer=a.optimizer, arch=a.arch, **kw)
    tsim = (Simulator(vol, probe=ps.probe, arch=a.arch, speckle=True)
            if "mismatched" in cases else None)
    t_build = time.perf_counter() - t0
    # warm-up: compile every level's forward and backward kernels
    t0 = time.perf_counter()
    ps.warmup(ps.render(trials[0][0]))
    if tsim is not None:
        tsim.render(trials[0][0])
    t_jit = time.perf_counter() - t0
    run_kw = {} if a.starts is None else {"n_starts": a.starts}
    rows = {c: [] for c in cases}
    load0 = os.getloadavg()
    for i, (truth, init, tseed) in enumerate(trials):
        trng = np.random.default_rng(tseed)
        for c in cases:
            if c == "matched":
                target = ps.render(truth)
            else:
                target = mismatched_target(tsim, truth, trng, seed=1000 + i)
            res = ps.run(target, init, true_pose=truth, seed=tseed, progress=a.progress, **run_kw)
            et, er = res.errors()
            e0 = init.error_to(truth)
            row = {"trial": i, "case": c, "success": bool(et < 1.0 and er < 1.0), "err_mm": et,
                   "err_deg": er, "init_err_mm": e0[0], "init_err_deg": e0[1],
                   "seconds": res.seconds, "iterations": res.iterations, "loss": res.loss,
                   "sample_evaluations": res.sample_evaluations, "attempts": res.attempts,
                   "match_loss": res.to_dict()["match_loss"],
                   "attempt_losses": res.attempt_losses,
                   "attempt_errors": [list(p.error_to(truth)) for p in res.attempt_poses],
                   "true_pose": truth.to_string(), "init_pose": init.to_string(),
                   "final_pose": res.pose.to_string(), "start_losses": res.start_losses}
            rows[c].append(row)
            print(f"[{c:10s} {i:3d}] {'ok  ' if row['success'] else 'FAIL'} err {et:6.2f} mm "
                  f"{er:6.2f} deg (init {e0[0]:5.1f} mm {e0[1]:5.1f} deg) {res.seconds:5.1f} s "
                  f"{res.iterations:4d} evals (+{res.sample_evaluations} loss-only) "
                  f"{res.attempts} attempt(s)", file=sys.stderr, flush=True)
    load1 = os.getloadavg()
    import taichi as ti

    hw = (f"{cpu_name()}, {os.cpu_count()} logical cores, arch {a.arch}, taichi "
          f"{'.'.join(map(str, ti.__version__))}, python {platform.python_version()}; "
          f"load average (1 min) {load0[0]:.2f} at start, {load1[0]:.2f} at end")
    summ = {c: summarize(rows[c]) for c in cases}
    print(f"\nPose search on the built-in brain, probe {ps.probe.name} {ps.probe.n_lines}x"
          f"{ps.probe.n_samples}, image {ps.probe.image_px[0]}, loss {ps.loss_kind}, optimizer "
          f"{ps.optimizer}, seed {a.seed}, {a.trials} trials; init +-{a.init_mm:g} mm / "
          f"+-{a.init_deg:g} deg per probe axis; success < 1 mm and < 1 deg\n")
    print("| case | success | median time (s) | p90 time (s) | median evals | p90 evals | "
          "median error (mm / deg) | restarted |")
    print("|---|---|---|---|---|---|---|---|")
    for c in cases:
        s = summ[c]
        print(f"| {c} | {100 * s['success_rate']:.0f} % ({sum(r['success'] for r in rows[c])}/"
              f"{s['n']}) | {s['median_s']:.1f} | {s['p90_s']:.1f} | {s['median_iters']:.0f} | "
              f"{s['p90_iters']:.0f} | {s['median_err_mm']:.2f} / {s['median_err_deg']:.2f} | "
              f"{s['restarted']} |")
    print(f"\nHardware: {hw}\nBuild {t_build:.1f} s, warm-up (JIT) {t_jit:.1f} s "
          "(not in the times)")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"args": vars(a), "hardware": hw, "summary": summ, "trials": rows,
                       "search": ps.describe() if hasattr(ps, "describe") else None,
                       "build_s": t_build, "warmup_s": t_jit}, fh, indent=2)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
