"""Tracked freehand sweep: a probe path (list of poses) -> simulated B-mode frames -> one
compounded 3-D ultrasound volume on a given grid (the MRI's affine and shape), written as NIfTI
like the ReMIND intra-operative volumes.

    poses = freehand_path(vol.default_pose, n_frames=61, length_mm=24)
    us, weight = sweep(sim, poses, mri.affine, mri.shape)     # (X, Y, Z) float32, 0 = not covered
    write_nifti("us.nii.gz", to_uint8(us), mri.affine)

Compounding: every fan pixel inside the sector is placed at its world position (probe plane,
``y = 0``) and splatted trilinearly into the grid (weights of the 8 surrounding voxels); a voxel's
value is the weighted mean of the frames that reached it and voxels with total weight below
``min_weight`` are empty (0).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import time

import numpy as np

from .pose import Pose
from .progress import Progress

log = logging.getLogger(__name__)


def freehand_path(around: Pose, n_frames: int = 61, length_mm: float = 24.0,
                  wobble_deg: float = 2.0, drift_mm: float = 1.0, seed: int = 0) -> list:
    """A freehand-like sweep: ``n_frames`` poses moving ``length_mm`` along the probe's
    elevation axis (out of the image plane) centred on ``around``, with a smooth random
    wobble (tilt and twist, up to ``wobble_deg``) and lateral drift (up to ``drift_mm``)."""
    if n_frames < 2:
        raise ValueError(f"a sweep needs at least 2 frames, got {n_frames}")
    if not (length_mm > 0 and math.isfinite(length_mm)):
        raise ValueError(f"sweep length_mm must be a positive number, got {length_mm}")
    rng = np.random.default_rng(seed)
    s = np.linspace(-0.5, 0.5, n_frames)
    ph = rng.uniform(0, 2 * np.pi, 4)
    out = []
    for u in s:
        lat = drift_mm * math.sin(2 * math.pi * u + ph[0])
        rot = np.radians(wobble_deg) * np.array([math.sin(3 * math.pi * u + ph[1]),
                                                 0.5 * math.sin(2 * math.pi * u + ph[2]),
                                                 math.sin(math.pi * u + ph[3])])
        out.append(around.moved((lat, u * length_mm, 0.0), rot))
    return out


def read_path(path: str) -> list:
    """Poses from a CSV/text file, one per line: tx,ty,tz (mm), rx,ry,rz (rotation vector in
    degrees); '#' comments and a header line starting with a letter are skipped."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"probe path file not found: {path!r}")
    poses = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            line = line.split("#")[0].strip()
            if not line or line[0].isalpha():
                continue
            try:
                poses.append(Pose.parse(line))
            except ValueError as e:
                raise ValueError(f"{path!r} line {n}: {e}") from None
    if len(poses) < 1:
        raise ValueError(f"probe path file {path!r} has no poses")
    return poses


class Compounder:
    """Accumulates fan frames into a grid (affine (4, 4) voxel -> world mm, shape (X, Y, Z))."""

    def __init__(self, probe, affine, shape):
        self.probe, self.shape = probe, tuple(int(s) for s in shape)
        self.affine = np.asarray(affine, dtype=np.float64)
        self.w2v = np.linalg.inv(self.affine)
        x, z = probe.fan_axes_mm()
        X, Z = np.meshgrid(x, z)
        self.inside = probe.scan_grid()[2]
        self.pts = np.stack([X[self.inside], np.zeros(self.inside.sum()), Z[self.inside]], -1)
        self.sum = np.zeros(self.shape, np.float64)
        self.wsum = np.zeros(self.shape, np.float64)

    def add(self, frame: np.ndarray, pose: Pose) -> None:
        frame = np.asarray(frame)
        if frame.shape != tuple(self.probe.image_px):
            raise ValueError(f"frame shape {frame.shape} != fan image {tuple(self.probe.image_px)}")
        idx = pose.probe_to_world(self.pts) @ self.w2v[:3, :3].T + self.w2v[:3, 3]
        v = frame[self.inside].astype(np.float64)
        i0 = np.floor(idx).astype(np.int64)
        f = idx - i0
        shp = np.array(self.shape)
        ok = np.all((i0 >= -1) & (i0 < shp), axis=1)
        if not ok.any():
            return
        i0, f, v = i0[ok], f[ok], v[ok]
        lo = np.maximum(i0.min(0), 0)
        hi = np.minimum(i0.max(0) + 2, shp)
        ext = hi - lo
        if np.any(ext <= 0):
            return
        acc_w = np.zeros(int(np.prod(ext)))
        acc_v = np.zeros(int(np.prod(ext)))
        for a in (0, 1):
            for b in (0, 1):
                for c in (0, 1):
                    ii = i0 + (a, b, c)
                    w = (f[:, 0] if a else 1 - f[:, 0]) * (f[:, 1] if b else 1 - f[:, 1]) \
                        * (f[:, 2] if c else 1 - f[:, 2])
                    good = np.all((ii >= lo) & (ii < hi), axis=1)
                    r = ii[good] - lo
                    flat = (r[:, 0] * ext[1] + r[:, 1]) * ext[2] + r[:, 2]
                    acc_w += np.bincount(flat, weights=w[good], minlength=acc_w.size)
                    acc_v += np.bincount(flat, weights=w[good] * v[good], minlength=acc_v.size)
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        self.wsum[sl] += acc_w.reshape(ext)
        self.sum[sl] += acc_v.reshape(ext)

    def result(self, min_weight: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
        """(compounded volume (X, Y, Z) float32, 0 where not covered; weight (X, Y, Z))."""
        cov = self.wsum > min_weight
        out = np.zeros(self.shape, np.float32)
        out[cov] = (self.sum[cov] / self.wsum[cov]).astype(np.float32)
        return out, self.wsum.astype(np.float32)


def sweep(sim, poses, affine, shape, progress: bool | None = None,
          min_weight: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Render ``sim`` at every pose and compound the frames on the grid (affine, shape).
    Returns (volume (X, Y, Z) float32 in [0, 1], 0 = not covered; splat weight (X, Y, Z))."""
    comp = Compounder(sim.probe, affine, shape)
    with Progress(len(poses), "sweep", enabled=progress) as bar:
        for p in poses:
            comp.add(sim.render(p), p)
            bar.update(1)
    us, w = comp.result(min_weight)
    log.info("sweep: %d frames, %.1f %% of the grid covered", len(poses),
             100.0 * float((w > min_weight).mean()))
    return us, w


def to_uint8(us: np.ndarray) -> np.ndarray:
    """Covered voxels -> 1..255 (1 + 254 * value), uncovered (exactly 0) -> 0, so that 'has
    data' stays ``> 0`` even in anechoic regions."""
    us = np.asarray(us, np.float32)
    out = np.where(us > 0, 1 + np.rint(254 * np.clip(us, 0, 1)), 0)
    return out.astype(np.uint8)


# --- command line ----------------------------------------------------------------------------
def add_sweep_parser(sub) -> argparse.ArgumentParser:
    from .cli import _add_common

    s = sub.add_parser(
        "sweep", help="tracked sweep: probe path -> frames -> compounded 3-D ultrasound NIfTI",
        description="Render B-mode frames along a probe path (a file of poses, or a generated "
                    "freehand-like sweep along the probe's elevation axis) and compound them into "
                    "one 3-D ultrasound volume on the grid of --like (an MRI NIfTI: its affine and "
                    "shape; default: the grid of --volume), written as NIfTI (uint8, 0 = not "
                    "covered, 1..255 = intensity) with that affine.")
    _add_common(s)
    s.add_argument("--path", default=None,
                   help="pose file: one 'tx,ty,tz,rx,ry,rz' per line (mm, rotation vector in "
                        "degrees) [default: generated freehand sweep]")
    s.add_argument("--around", default=None,
                   help="centre pose of the generated sweep [default: the volume's default pose]")
    s.add_argument("--frames", type=int, default=61, help="frames of the generated sweep [61]")
    s.add_argument("--length-mm", type=float, default=24.0,
                   help="length of the generated sweep along the elevation axis (mm) [24]")
    s.add_argument("--wobble-deg", type=float, default=2.0, help="freehand wobble (degrees) [2]")
    s.add_argument("--like", default=None,
                   help="NIfTI whose affine and shape define the output grid (e.g. the case MRI)")
    s.add_argument("--out", required=True, help="output NIfTI (.nii.gz)")
    s.add_argument("--save-poses", default=None, help="also write the poses used (CSV)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sweep)
    return s


def cmd_sweep(a) -> int:
    from .cli import _simulator_from_args
    from .remind import write_nifti

    if a.path is None and a.frames < 2:
        raise ValueError(f"--frames must be >= 2, got {a.frames}")
    if a.like is not None:
        import nibabel as nib

        if not os.path.exists(a.like):
            raise FileNotFoundError(f"--like grid file not found: {a.like!r}")
        try:
            hdr = nib.load(a.like)
        except Exception as e:
            raise ValueError(f"cannot read --like {a.like!r} as NIfTI: {e}") from None
        affine, shape = np.asarray(hdr.affine), tuple(int(s) for s in hdr.shape[:3])
    poses = read_path(a.path) if a.path else None
    t0 = time.perf_counter()
    sim = _simulator_from_args(a)
    if a.like is None:
        affine, shape = sim.volume.affine, sim.volume.shape
    if poses is None:
        around = Pose.parse(a.around) if a.around else sim.volume.default_pose
        poses = freehand_path(around, a.frames, a.length_mm, a.wobble_deg, seed=a.seed)
    us, w = sweep(sim, poses, affine, shape, progress=False if a.no_progress else None)
    write_nifti(a.out, to_uint8(us), affine)
    if a.save_poses:
        with open(a.save_poses, "w", newline="") as fh:
            wr = csv.writer(fh)
            wr.writerow(["tx_mm", "ty_mm", "tz_mm", "rx_deg", "ry_deg", "rz_deg"])
            for p in poses:
                wr.writerow([f"{v:.6f}" for v in (*p.translation_mm, *np.degrees(p.rotvec_rad))])
    cov = float((us > 0).mean())
    log.info("sweep: %d frames -> %s (grid %s, %.2f %% covered) in %.1f s", len(poses), a.out,
             shape, 100 * cov, time.perf_counter() - t0)
    print(json.dumps({"out": a.out, "frames": len(poses), "coverage_fraction": cov}))
    return 0
