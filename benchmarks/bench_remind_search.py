"""Pose search against a real-like ultrasound target: a synthetic ReMIND2Reg case (ceT1 = the
built-in brain's T1, US = compounded tracked sweep of simulated frames rendered from the brain's
tissue model), target = the US volume resliced at a sweep pose, simulation = the case's ceT1
through the T1 transfer function (a different acoustic model than the one that made the US).
Starts: truth perturbed by up to +-offset_mm and +-offset_deg per probe axis.

Two simulation models on the same trials (``--models``):
* ``brain``: the built-in brain's tissue model, the acoustics that made the sweep (matched
  acoustics; the target still differs: compounded, resampled to 1 mm, speckle averaged);
* ``case``: the case's ceT1 through the default T1 transfer function (mismatched acoustics,
  as with real data before the mapping is fitted).

    python benchmarks/bench_remind_search.py --trials 10 --seed 0 --arch cpu

Prints one row per trial and the success rates (< 1 mm and < 1 deg; and < 2 mm and < 2 deg).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from diffus_taichi import remind  # noqa: E402
from diffus_taichi.probe import get_probe  # noqa: E402
from diffus_taichi.remind_compare import search_case  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", default="cpu")
    ap.add_argument("--size-mm", type=float, default=112.0, help="case cube edge (mm)")
    ap.add_argument("--spacing-mm", type=float, default=0.5,
                    help="case voxel size (mm) [0.5, as ReMIND2Reg]")
    ap.add_argument("--sweep-frames", type=int, default=61)
    ap.add_argument("--sweep-length-mm", type=float, default=24.0)
    ap.add_argument("--offset-mm", type=float, default=10.0)
    ap.add_argument("--offset-deg", type=float, default=10.0)
    ap.add_argument("--starts", type=int, default=None)
    ap.add_argument("--loss", default="ncc")
    ap.add_argument("--case-dir", default=None, help="reuse/keep the synthetic case here")
    ap.add_argument("--models", default="brain,case", help="brain and/or case (see above)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from diffus_taichi.registration import PoseSearch
    from diffus_taichi.simulator import Simulator
    from diffus_taichi.us_reslice import USReslicer

    probe = get_probe("craniotomy")
    root = a.case_dir or tempfile.mkdtemp(prefix="remind_bench_")
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(root, "imagesTr", remind.image_name("0000", "us"))):
        sim = Simulator("brain", probe=probe, arch=a.arch, seed=a.seed + 1)
        remind.make_synthetic_case(root, "0000", size_mm=a.size_mm, spacing_mm=a.spacing_mm,
                                   with_t2=False, sweep_frames=a.sweep_frames,
                                   sweep_length_mm=a.sweep_length_mm, sim=sim, seed=a.seed)
    case = remind.open_case(root)
    t_case = time.perf_counter() - t0
    mri, us = case.load_mri(), case.load_us()
    rs = USReslicer(us, probe)
    sweep = case.sweep_poses()
    rng = np.random.default_rng(a.seed)
    n = len(sweep)
    trials = []
    for k in range(a.trials):
        true = sweep[int(rng.integers(n // 4, n - n // 4))]
        d_t = rng.uniform(-1, 1, 3) * a.offset_mm
        d_r = np.radians(rng.uniform(-1, 1, 3) * a.offset_deg)
        trials.append((true, true.moved(d_t, d_r)))
    print(f"case {root}: {us.shape} at {a.spacing_mm} mm, US coverage "
          f"{100 * float((us.display_channel() > 0).mean()):.1f} %, built in {t_case:.1f} s; "
          f"probe {probe.name} {probe.n_lines}x{probe.n_samples}, loss {a.loss}, "
          f"starts within +-{a.offset_mm:g} mm, +-{a.offset_deg:g} deg per axis")
    summary, rows = {}, []
    for model in a.models.split(","):
        vol = "brain" if model == "brain" else mri
        ps = PoseSearch(vol, probe, loss=a.loss, arch=a.arch)
        print(f"\nmodel {model}: simulation from {ps.volume.name} ({ps.sims[0].mapping.kind} mapping)")
        print("| trial | start error (mm / deg) | final error (mm / deg) | success <1mm,1deg | "
              "time (s) | evaluations |")
        print("|---|---|---|---|---|---|")
        mrows = []
        for k, (true, start) in enumerate(trials):
            e0 = start.error_to(true)
            res, info = search_case(case, true, probe, init_pose=start, search=ps, reslicer=rs,
                                    n_starts=a.starts, seed=a.seed + k, true_pose=true,
                                    progress=False)
            et, er = res.errors()
            ok = et < 1.0 and er < 1.0
            mrows.append(dict(model=model, trial=k, start_mm=e0[0], start_deg=e0[1], err_mm=et,
                              err_deg=er, success=ok, success2=et < 2.0 and er < 2.0,
                              seconds=res.seconds, evaluations=res.iterations,
                              coverage=info["coverage"]))
            print(f"| {k} | {e0[0]:.1f} / {e0[1]:.1f} | {et:.2f} / {er:.2f} | "
                  f"{'yes' if ok else 'no'} | {res.seconds:.1f} | {res.iterations} |", flush=True)
        s1 = sum(r["success"] for r in mrows)
        s2 = sum(r["success2"] for r in mrows)
        med_t = statistics.median(r["seconds"] for r in mrows)
        med_e = (statistics.median(r["err_mm"] for r in mrows),
                 statistics.median(r["err_deg"] for r in mrows))
        summary[model] = dict(success=s1, success2=s2, trials=len(mrows), median_s=med_t,
                              median_err_mm=med_e[0], median_err_deg=med_e[1])
        print(f"model {model}: success (< 1 mm and < 1 deg): {s1}/{len(mrows)} = "
              f"{100 * s1 / len(mrows):.0f} %; (< 2 mm and < 2 deg): {s2}/{len(mrows)} = "
              f"{100 * s2 / len(mrows):.0f} %; median time {med_t:.1f} s; median error "
              f"{med_e[0]:.2f} mm / {med_e[1]:.2f} deg", flush=True)
        rows += mrows
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"args": vars(a), "rows": rows, "summary": summary,
                       "search": ps.describe()}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
