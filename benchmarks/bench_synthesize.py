"""Throughput of dataset synthesis (`diffus-taichi synthesize`): frames/s for the built-in brain
at random surface poses, with and without PNG output, after a warm-up (JIT excluded).

    python benchmarks/bench_synthesize.py --n 200 --arch cpu --lines 256 --samples 512

Prints a table row per configuration: total frames/s (pose draw + render + uint8 + writes) and
render-only frames/s. Measure on an otherwise idle machine (frames get slower when other
processes share the cores; the table states the load average).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from diffus_taichi import synthesis  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--arch", default="cpu")
    ap.add_argument("--lines", type=int, default=256)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--image-px", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    cfg = synthesis.SynthesisConfig(n=a.n, seed=a.seed, probe_overrides=dict(
        n_lines=a.lines, n_samples=a.samples, image_px=(a.image_px, a.image_px)))
    syn = synthesis.Synthesizer(cfg, arch=a.arch)
    with tempfile.TemporaryDirectory() as tmp:   # warm-up: compile every kernel once
        warm = synthesis.SynthesisConfig(n=2, seed=a.seed + 1, probe_overrides=cfg.probe_overrides)
        synthesis.Synthesizer(warm, sim=syn.sim).run(tmp, progress=False)
    print(f"| backend | lines x samples | fan px | frames | PNG | frames/s (total) | "
          f"frames/s (render only) | load average (1 min) |")
    print("|---|---|---|---:|---|---:|---:|---:|")
    for png in (True, False):
        cfg.png = png
        with tempfile.TemporaryDirectory() as tmp:
            s = syn.run(tmp, progress=False)
        load = os.getloadavg()[0]
        print(f"| {s['arch']} | {a.lines} x {a.samples} | {a.image_px} x {a.image_px} | {s['frames']} | "
              f"{'yes' if png else 'no'} | {s['frames_per_s']:.1f} | {s['render_frames_per_s']:.1f} | "
              f"{load:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
