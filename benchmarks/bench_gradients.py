#!/usr/bin/env python
"""Forward vs forward+backward (Tape) time of the Simulator, per backend and size.

For each case it times (median of --repeats, alternating frame by frame so load bursts hit both):
  forward      sim.set_pose(p); sim.forward(); ti.sync()
  fwd+bwd      sim.value_and_grad(p)  (loss kernels + Tape backward, pose gradient; with
               --wrt mapping also the tissue-table gradient through the property volume)
and prints a Markdown table with the ratio.

    python benchmarks/bench_gradients.py --arch cpu --sizes 256x512
"""
import argparse
import os
import platform
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore", message=".*unrolling more than.*")
warnings.filterwarnings("ignore", message=".*getdefaultlocale.*", category=DeprecationWarning)

import taichi as ti  # noqa: E402

from diffus_taichi import backend, get_probe, load_volume  # noqa: E402
from diffus_taichi.simulator import Simulator  # noqa: E402


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default=None, help="comma list (default: all available)")
    ap.add_argument("--sizes", default="128x256,256x512")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--volume", default="brain")
    ap.add_argument("--loss", default="ncc")
    ap.add_argument("--wrt", default="pose", choices=["pose", "mapping"])
    a = ap.parse_args(argv)
    archs = a.arch.split(",") if a.arch else backend.available_archs()
    print(f"# {cpu_name()}, {os.cpu_count()} cores; taichi {ti.__version__}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"| backend | lines x samples | fan px | forward ms | fwd+bwd ms ({a.loss}, d/d {a.wrt}) | ratio |")
    print("|---|---|---|---:|---:|---:|")
    vol = load_volume(a.volume)
    for arch in archs:
        backend.ensure(arch, "f32")
        for size in a.sizes.split(","):
            L, S = (int(v) for v in size.split("x"))
            probe = get_probe("craniotomy", n_lines=L, n_samples=S, image_px=(512, 512))
            sim = Simulator(vol, probe=probe, arch=arch,
                            requires_grad=True if a.wrt == "mapping" else "pose")
            p0 = vol.default_pose
            target = sim.render(p0)
            sim.set_loss(target, a.loss)
            p1 = p0.moved((1.0, 0.0, 0.5), np.radians([1.0, 0.0, 0.0]))
            wrt = ("pose", "mapping") if a.wrt == "mapping" else ("pose",)
            for _ in range(3):
                sim.value_and_grad(p1, wrt=wrt)
            tf, tb = [], []
            for _ in range(a.repeats):
                t = time.perf_counter()
                sim.set_pose(p1)
                sim.forward()
                ti.sync()
                tf.append(time.perf_counter() - t)
                t = time.perf_counter()
                sim.value_and_grad(p1, wrt=wrt)
                ti.sync()
                tb.append(time.perf_counter() - t)
            f, b = np.median(tf) * 1e3, np.median(tb) * 1e3
            print(f"| {arch} | {L} x {S} | 512 x 512 | {f:.1f} | {b:.1f} | {b / f:.2f} |", flush=True)


if __name__ == "__main__":
    main()
