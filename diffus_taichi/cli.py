"""Command line: ``diffus-taichi render ...`` (also ``python -m diffus_taichi``)."""
from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np

log = logging.getLogger("diffus_taichi")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--volume", default="brain",
                   help="built-in volume (brain, phantom, phantom-noskull, uniform, wires, cysts, "
                        "layers) or a NIfTI "
                        "path (.nii/.nii.gz, world mm from its affine) [default: brain]")
    p.add_argument("--probe", default="craniotomy",
                   help="probe preset: craniotomy, phased, convex, linear [default: craniotomy]")
    p.add_argument("--lines", type=int, help="number of scan lines")
    p.add_argument("--samples", type=int, help="samples per line")
    p.add_argument("--depth-mm", type=float, help="imaging depth (mm)")
    p.add_argument("--fov-deg", type=float, help="fan opening angle (degrees; curvilinear/sector)")
    p.add_argument("--radius-mm", type=float, help="convex radius (mm); 0 = phased sector")
    p.add_argument("--width-mm", type=float, help="aperture width of a linear probe (mm)")
    p.add_argument("--frequency-mhz", type=float, help="centre frequency (MHz)")
    p.add_argument("--image-px", type=int, help="fan image size (pixels, square)")
    p.add_argument("--mapping", default="auto",
                   help="MRI -> acoustics: auto (tissue fractions if present, else t2 for T2 "
                        "volumes, else t1), tissue (table + tissue fractions), t1 / transfer "
                        "(piecewise-linear of T1 intensity), t2 (MLP from the T2 knot table) or "
                        "a mapping .json file")
    p.add_argument("--echo-model", default="primary", choices=["primary", "layered", "reverb"],
                   help="echo physics [default: primary]")
    p.add_argument("--arch", default=None, choices=["auto", "cuda", "vulkan", "cpu"],
                   help="Taichi backend [default: $DIFFUS_ARCH or auto = cuda > vulkan > cpu]")
    p.add_argument("--gain-db", type=float, default=12.0, help="display gain (dB) [12]")
    p.add_argument("--dynamic-range-db", type=float, default=50.0, help="dynamic range (dB) [50]")
    p.add_argument("--tgc-db-per-cm", type=float, default=None,
                   help="time-gain compensation (dB/cm) [1.2 x frequency in MHz]")
    p.add_argument("--no-speckle", action="store_true", help="switch tissue scatterers off")
    p.add_argument("--seed", type=int, default=1, help="scatterer realisation [1]")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _probe_from_args(a):
    from .probe import get_probe

    px = (a.image_px, a.image_px) if a.image_px else None
    return get_probe(a.probe, n_lines=a.lines, n_samples=a.samples, depth_mm=a.depth_mm,
                     fov_deg=a.fov_deg, radius_mm=a.radius_mm, width_mm=a.width_mm,
                     frequency_mhz=a.frequency_mhz, image_px=px)


def _simulator_from_args(a):
    from .simulator import Simulator

    return Simulator(a.volume, probe=_probe_from_args(a), mapping=a.mapping,
                     echo_model=a.echo_model, arch=a.arch, gain_db=a.gain_db,
                     dynamic_range_db=a.dynamic_range_db, tgc_db_per_cm=a.tgc_db_per_cm,
                     speckle=not a.no_speckle, seed=a.seed)


def cmd_render(a) -> int:
    from .pose import Pose
    from .visualization import render_figure

    t0 = time.perf_counter()
    sim = _simulator_from_args(a)
    pose = Pose.parse(a.pose) if a.pose else sim.volume.default_pose
    fan = sim.render(pose)
    t_render = time.perf_counter() - t0
    render_figure(sim, fan, a.out)
    if a.save_npz:
        np.savez_compressed(a.save_npz, **sim.stages(), **sim.geometry(),
                            mri_reslice=sim.reslice(), probe=repr(sim.probe),
                            echo_model=sim.echo_model, volume=sim.volume.name)
        log.info("wrote %s", a.save_npz)
    log.info("pose (tx,ty,tz mm, rotvec deg): %s", pose.to_string())
    log.info("coverage of the fan inside the volume: %.0f %%", 100 * sim.coverage)
    log.info("rendered %dx%d on %s in %.2f s (JIT included); total %.2f s",
             sim.probe.n_lines, sim.probe.n_samples, sim.arch, t_render, time.perf_counter() - t0)
    print(a.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diffus-taichi",
        description="Differentiable B-mode ultrasound simulation from 3-D MRI (Taichi). "
                    "Units: mm, degrees, MHz, dB, dB/cm/MHz, MRayl.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="render a B-mode fan image and the MRI reslice beside it",
                       description="Render a B-mode image at a probe pose. Writes a PNG figure "
                                   "(MRI reslice | B-mode, both in mm) and optionally every stage.")
    _add_common(r)
    r.add_argument("--pose", default=None,
                   help="probe-to-world pose 'tx,ty,tz,rx,ry,rz' (translation in mm, rotation "
                        "vector in degrees) or a file with a 4x4 matrix [default: the volume's "
                        "craniotomy-like default pose]")
    r.add_argument("--out", default="fan.png", help="output PNG figure [fan.png]")
    r.add_argument("--save-npz", default=None,
                   help="also save every stage, the pose and the geometry to this .npz")
    r.set_defaults(func=cmd_render)
    from .registration import add_search_parser; add_search_parser(sub)  # noqa: E702
    from .mapping_fit import add_fit_parser; add_fit_parser(sub)  # noqa: E702
    from .app import add_demo_parser; add_demo_parser(sub)  # noqa: E702
    from .remind_compare import add_compare_parser; add_compare_parser(sub)  # noqa: E702
    from .sweep import add_sweep_parser; add_sweep_parser(sub)  # noqa: E702
    from .synthesis import add_synthesize_parser; add_synthesize_parser(sub)  # noqa: E702
    from .bench import add_bench_parser; add_bench_parser(sub)  # noqa: E702
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
