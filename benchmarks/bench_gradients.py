#!/usr/bin/env python
"""Forward vs forward+backward (Tape) time of the Simulator, per backend and size.

For each case it times (median of --repeats, alternating frame by frame so load bursts hit both):
  forward      sim.set_pose(p); sim.forward(); ti.sync()
  fwd+bwd      sim.value_and_grad(p)  (loss kernels + Tape backward, pose gradient; with
               --wrt mapping also the tissue-table gradient through the property volume)
and prints a Markdown table with the ratio. The timing is ``diffus_taichi.bench.time_backward``
(shared with ``diffus-taichi bench``).

    python benchmarks/bench_gradients.py --arch cpu --sizes 256x512
"""
import argparse
import os

from diffus_taichi import bench

bench._quiet_warnings()

from diffus_taichi import load_volume  # noqa: E402


def cpu_name() -> str:
    return bench.cpu_model()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default=None, help="comma list (default: all available)")
    ap.add_argument("--sizes", default="128x256,256x512")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--volume", default="brain")
    ap.add_argument("--loss", default="ncc")
    ap.add_argument("--wrt", default="pose", choices=["pose", "mapping"])
    a = ap.parse_args(argv)
    try:
        archs = bench.parse_archs(a.arch)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    hw = bench.hardware()
    print(f"# {hw['cpu_model']}, {os.cpu_count()} cores; taichi {hw['taichi']}; "
          f"load average {hw['loadavg_1_5_15'][0] if hw['loadavg_1_5_15'] else 'n/a'}")
    print(f"| backend | lines x samples | fan px | forward ms | fwd+bwd ms ({a.loss}, d/d {a.wrt}) | ratio |")
    print("|---|---|---|---:|---:|---:|")
    vol = load_volume(a.volume)
    wrt = ("pose", "mapping") if a.wrt == "mapping" else ("pose",)
    for arch in archs:
        for L, S in bench.parse_sizes(a.sizes):
            sim, _ = bench.make_sim(vol, arch, L, S, (512, 512),
                                    requires_grad=True if a.wrt == "mapping" else "pose")
            r = bench.time_backward(sim, a.repeats, loss=a.loss, wrt=wrt)
            f, b = r["forward"]["median_ms"], r["fwd_bwd"]["median_ms"]
            print(f"| {arch} | {L} x {S} | 512 x 512 | {f:.1f} | {b:.1f} | {b / f:.2f} |", flush=True)
            del sim


if __name__ == "__main__":
    main()
