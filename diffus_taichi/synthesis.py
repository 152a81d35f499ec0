"""Dataset synthesis at scale: many B-mode images at random probe poses on the brain surface,
deterministic per seed, split into shards that any scheduler can run in parallel.

Frame ``i`` (0 <= i < n) is fully determined by (seed, i): its pose comes from
``numpy.random.default_rng([seed, i])`` and its speckle realisation is ``speckle_seed(seed, i)``,
so a shard ``K/M`` (frames ``K*n//M`` to ``(K+1)*n//M - 1``) renders exactly the frames the
unsharded run would, bit for bit (same backend).

Pose of a frame: a direction ``u`` drawn uniformly in a cone of ``cone_deg`` around
``region_dir`` (world), the probe placed on the outer surface of the brain (content mask) along
``u`` from the content's centre (``standoff_mm`` outside it) looking inwards (``-u``), then
tilted by an angle uniform in [0, ``tilt_deg``] about a random in-plane axis and rotated about its
own axis by an angle uniform in +-``roll_deg``.

Outputs in ``out``: ``images/<i:06d>.png`` (8-bit fan), ``frames[-shard-K-of-M].npy`` (uint8
(n, H, W), written incrementally), ``poses[...].csv`` (index, pose in mm and degrees, speckle
seed, fan coverage) and ``config[...].json`` (everything needed to reproduce the run).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from .pose import Pose, rotvec_to_matrix
from .progress import Progress

log = logging.getLogger(__name__)

CSV_HEADER = ["index", "tx_mm", "ty_mm", "tz_mm", "rx_deg", "ry_deg", "rz_deg", "speckle_seed",
              "coverage"]


@dataclass
class PoseRegion:
    """Where probe poses are drawn (see the module docstring). Angles in degrees, lengths mm."""

    region_dir: tuple = (0.0, 0.0, 1.0)
    cone_deg: float = 60.0
    tilt_deg: float = 15.0
    roll_deg: float = 180.0
    standoff_mm: float = 0.5
    content_threshold: float = 0.3

    def validate(self):
        d = np.asarray(self.region_dir, dtype=np.float64)
        if d.shape != (3,) or not np.all(np.isfinite(d)) or np.linalg.norm(d) < 1e-9:
            raise ValueError(f"region_dir must be 3 finite numbers, not all 0; got {self.region_dir}")
        if not (0 <= self.cone_deg <= 180):
            raise ValueError(f"cone_deg must be in [0, 180] degrees, got {self.cone_deg}")
        if not (0 <= self.tilt_deg < 90):
            raise ValueError(f"tilt_deg must be in [0, 90) degrees, got {self.tilt_deg}")
        if not (0 <= self.roll_deg <= 180):
            raise ValueError(f"roll_deg must be in [0, 180] degrees, got {self.roll_deg}")
        if not (math.isfinite(self.standoff_mm) and abs(self.standoff_mm) <= 50):
            raise ValueError(f"standoff_mm must be within +-50 mm, got {self.standoff_mm}")


def speckle_seed(seed: int, i: int) -> int:
    """Scatterer realisation of frame ``i`` (31-bit)."""
    return int((int(seed) * 1_000_003 + int(i) * 7919 + 1) % (2 ** 31 - 1))


def shard_range(n: int, shard: int, n_shards: int) -> range:
    """Frames of shard ``shard`` (0-based) of ``n_shards``: contiguous, balanced, disjoint, and
    together exactly ``range(n)``."""
    if n_shards < 1 or not (0 <= shard < n_shards):
        raise ValueError(f"shard must be K/M with 0 <= K < M, got {shard}/{n_shards}")
    return range(shard * n // n_shards, (shard + 1) * n // n_shards)


def parse_shard(text: str | None) -> tuple[int, int]:
    """'K/M' -> (K, M); None -> (0, 1)."""
    if text is None:
        return 0, 1
    try:
        k, m = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard must be K/M (0-based K, e.g. 3/8), got {text!r}") from None
    shard_range(0, k, m)
    return k, m


def content_mask(volume, threshold: float) -> np.ndarray:
    """Brain mask: grey + white matter fractions if the volume has them, else intensity."""
    names = [n for n in ("grey_matter", "white_matter") if n in volume.channel_names]
    c = sum(volume.channel(n) for n in names) if names else volume.display_channel()
    return np.asarray(c) > threshold


class PoseSampler:
    """Draws frame poses on the surface of a volume's content (deterministic per (seed, i))."""

    def __init__(self, volume, region: PoseRegion):
        region.validate()
        self.volume, self.region = volume, region
        self.mask = content_mask(volume, region.content_threshold)
        if not self.mask.any():
            raise ValueError(f"volume {volume.name!r}: no content above threshold "
                             f"{region.content_threshold} to put a probe on")
        idx = np.argwhere(self.mask)
        self.centre = volume.voxel_to_world(idx.mean(0))
        self.step = 0.5 * float(volume.spacing_mm.min())
        ext = np.linalg.norm(np.array(volume.shape) * volume.spacing_mm)
        self.radii = np.arange(0.0, ext, self.step)
        d = np.asarray(region.region_dir, dtype=np.float64)
        self.axis = d / np.linalg.norm(d)

    def surface_point(self, u: np.ndarray) -> np.ndarray | None:
        """Outermost content point along ``u`` from the centre, plus the standoff (or None)."""
        pts = self.centre + self.radii[:, None] * u
        ijk = np.rint(self.volume.world_to_index(pts)).astype(int)
        ok = np.all((ijk >= 0) & (ijk < np.array(self.volume.shape)), axis=1)
        hit = np.zeros(len(pts), bool)
        hit[ok] = self.mask[tuple(ijk[ok].T)]
        if not hit.any():
            return None
        r = self.radii[np.nonzero(hit)[0][-1]]
        return self.centre + (r + self.region.standoff_mm) * u

    def pose(self, seed: int, i: int) -> Pose:
        rg = self.region
        rng = np.random.default_rng([int(seed), int(i)])
        for _ in range(100):
            cos_max = math.cos(math.radians(rg.cone_deg))
            cz = rng.uniform(cos_max, 1.0)            # uniform on the spherical cap
            phi = rng.uniform(0, 2 * math.pi)
            sz = math.sqrt(max(0.0, 1 - cz * cz))
            a = self.axis
            e1 = np.cross(a, [1.0, 0, 0] if abs(a[0]) < 0.9 else [0, 1.0, 0])
            e1 /= np.linalg.norm(e1)
            e2 = np.cross(a, e1)
            u = cz * a + sz * (math.cos(phi) * e1 + math.sin(phi) * e2)
            origin = self.surface_point(u)
            tilt = math.radians(rng.uniform(0, rg.tilt_deg))
            tphi = rng.uniform(0, 2 * math.pi)
            roll = math.radians(rng.uniform(-rg.roll_deg, rg.roll_deg))
            if origin is None:
                continue
            base = Pose.look_at(origin, -u, e1)
            R = base.rotation @ rotvec_to_matrix([0, 0, roll]) \
                @ rotvec_to_matrix([tilt * math.cos(tphi), tilt * math.sin(tphi), 0.0])
            M = np.eye(4)
            M[:3, :3], M[:3, 3] = R, origin
            return Pose.from_matrix(M)
        raise ValueError(f"no surface point found in the pose region after 100 draws (frame {i})")


@dataclass
class SynthesisConfig:
    """Everything that determines a synthesis run (written to config.json)."""

    volume: str = "brain"
    n: int = 100
    seed: int = 0
    probe: str = "craniotomy"
    probe_overrides: dict | None = None
    echo_model: str = "primary"
    mapping: str = "auto"
    gain_db: float = 12.0
    dynamic_range_db: float = 50.0
    tgc_db_per_cm: float | None = None
    speckle: bool = True
    region: PoseRegion | None = None
    png: bool = True
    batch: int = 32

    def __post_init__(self):
        if self.region is None:
            self.region = PoseRegion()
        elif isinstance(self.region, dict):
            self.region = PoseRegion(**self.region)
        if not isinstance(self.n, (int, np.integer)) or self.n < 1:
            raise ValueError(f"n (number of frames) must be a positive integer, got {self.n!r}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        self.region.validate()

    def to_dict(self) -> dict:
        return asdict(self)


class Synthesizer:
    """One Simulator (fields allocated once, reused for every frame and every shard) and one
    pose sampler for a config; :meth:`run` writes a shard."""

    def __init__(self, cfg: SynthesisConfig, arch=None, sim=None):
        from .probe import get_probe
        from .simulator import Simulator

        self.cfg = cfg
        probe = get_probe(cfg.probe, **(cfg.probe_overrides or {}))
        # frames render cfg.batch at a time (one launch per stage for the whole batch)
        self.sim = sim or Simulator(cfg.volume, probe=probe, mapping=cfg.mapping,
                                    echo_model=cfg.echo_model, arch=arch, gain_db=cfg.gain_db,
                                    dynamic_range_db=cfg.dynamic_range_db,
                                    tgc_db_per_cm=cfg.tgc_db_per_cm, speckle=cfg.speckle,
                                    batch=cfg.batch)
        self.sampler = PoseSampler(self.sim.volume, cfg.region)

    def poses(self, indices) -> list:
        return [self.sampler.pose(self.cfg.seed, i) for i in indices]

    def render(self, i: int, pose: Pose) -> np.ndarray:
        """uint8 (H, W) fan of frame ``i``."""
        return self.render_many([i], [pose])[0]

    def render_many(self, indices, poses) -> np.ndarray:
        """uint8 (n, H, W) fans of frames ``indices`` at ``poses``, in batches of the
        Simulator's ``batch`` (the last batch padded with its last pose); per-frame coverage in
        ``self.coverages``."""
        B = self.sim.batch
        out, cov = [], []
        for b0 in range(0, len(indices), B):
            idx, ps = list(indices[b0:b0 + B]), list(poses[b0:b0 + B])
            n = len(idx)
            idx += [idx[-1]] * (B - n)
            ps += [ps[-1]] * (B - n)
            fans = self.sim.render_batch(ps, seeds=np.array([speckle_seed(self.cfg.seed, i)
                                                             for i in idx], dtype=np.int64))
            out.append(fans[:n])
            cov += self.sim.coverages[:n]
        self.coverages = cov
        return np.clip(np.rint(np.concatenate(out) * 255.0), 0, 255).astype(np.uint8)

    def run(self, out: str, shard: int = 0, n_shards: int = 1, progress: bool | None = None) -> dict:
        """Render this shard's frames into ``out``; returns a summary (frames, seconds, fps)."""
        cfg = self.cfg
        idx = shard_range(cfg.n, shard, n_shards)
        suffix = "" if n_shards == 1 else f"-shard-{shard:04d}-of-{n_shards:04d}"
        os.makedirs(out, exist_ok=True)
        if cfg.png:
            os.makedirs(os.path.join(out, "images"), exist_ok=True)
        H, W = self.sim.probe.image_px
        arr_path = os.path.join(out, f"frames{suffix}.npy")
        frames = np.lib.format.open_memmap(arr_path, mode="w+", dtype=np.uint8,
                                           shape=(len(idx), H, W))
        rows = []
        t0 = time.perf_counter()
        t_render = 0.0
        with Progress(len(idx), f"synthesize {shard}/{n_shards}", enabled=progress) as bar:
            for b0 in range(0, len(idx), cfg.batch):
                batch = idx[b0:b0 + cfg.batch]
                poses = self.poses(batch)
                tr = time.perf_counter()
                imgs = self.render_many(batch, poses)
                t_render += time.perf_counter() - tr
                for j, (i, p) in enumerate(zip(batch, poses)):
                    img = imgs[j]
                    frames[b0 + j] = img
                    if cfg.png:
                        _write_png(os.path.join(out, "images", f"{i:06d}.png"), img)
                    rows.append([i, *(f"{v:.6f}" for v in p.translation_mm),
                                 *(f"{v:.6f}" for v in np.degrees(p.rotvec_rad)),
                                 speckle_seed(cfg.seed, i), f"{self.coverages[j]:.4f}"])
                    bar.update(1)
                frames.flush()
        seconds = time.perf_counter() - t0
        del frames
        with open(os.path.join(out, f"poses{suffix}.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(CSV_HEADER)
            w.writerows(rows)
        summary = {"frames": len(idx), "first": idx.start, "stop": idx.stop, "shard": shard,
                   "n_shards": n_shards, "seconds": seconds, "render_seconds": t_render,
                   "frames_per_s": len(idx) / seconds if seconds > 0 else float("nan"),
                   "render_frames_per_s": len(idx) / t_render if t_render > 0 else float("nan"),
                   "lines_x_samples": [self.sim.probe.n_lines, self.sim.probe.n_samples],
                   "image_px": list(self.sim.probe.image_px), "arch": self.sim.arch}
        with open(os.path.join(out, f"config{suffix}.json"), "w") as fh:
            json.dump({"config": cfg.to_dict(), "probe": repr(self.sim.probe),
                       "outputs": {"frames": os.path.basename(arr_path),
                                   "poses": f"poses{suffix}.csv",
                                   "images": "images/<index:06d>.png" if cfg.png else None},
                       "run": summary}, fh, indent=2)
        log.info("synthesize shard %d/%d: %d frames in %.1f s (%.2f frames/s; render only %.2f "
                 "frames/s)", shard, n_shards, len(idx), seconds, summary["frames_per_s"],
                 summary["render_frames_per_s"])
        return summary


def _write_png(path: str, img: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(img).save(path, compress_level=1)


def merge_shards(out: str, n_shards: int) -> dict:
    """Concatenate ``frames-shard-*.npy`` and ``poses-shard-*.csv`` of ``n_shards`` shards into
    ``frames.npy`` and ``poses.csv`` (the unsharded outputs); errors if a shard is missing."""
    arrays, rows = [], []
    for k in range(n_shards):
        sfx = f"-shard-{k:04d}-of-{n_shards:04d}"
        a, p = os.path.join(out, f"frames{sfx}.npy"), os.path.join(out, f"poses{sfx}.csv")
        for f in (a, p):
            if not os.path.exists(f):
                raise FileNotFoundError(f"shard {k}/{n_shards} output missing: {f!r}")
        arrays.append(np.load(a, mmap_mode="r"))
        with open(p) as fh:
            rows.extend(list(csv.reader(fh))[1:])
    total = sum(len(x) for x in arrays)
    H, W = arrays[0].shape[1:]
    merged = np.lib.format.open_memmap(os.path.join(out, "frames.npy"), mode="w+", dtype=np.uint8,
                                       shape=(total, H, W))
    o = 0
    for x in arrays:
        merged[o:o + len(x)] = x
        o += len(x)
    merged.flush()
    del merged
    with open(os.path.join(out, "poses.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_HEADER)
        w.writerows(rows)
    return {"frames": total, "shards": n_shards}


# --- command line ----------------------------------------------------------------------------
def add_synthesize_parser(sub) -> argparse.ArgumentParser:
    from .cli import _add_common

    s = sub.add_parser(
        "synthesize", help="render a dataset of B-mode images at random surface poses (shardable)",
        description="Render N B-mode images at probe poses drawn on the brain surface pointing "
                    "inwards (random direction in a cone, tilt and rotation), deterministic for "
                    "--seed. Writes images/<i>.png, frames.npy (uint8 N x H x W), poses.csv and "
                    "config.json. --shard K/M renders only the K-th of M contiguous parts "
                    "(0-based; outputs suffixed -shard-K-of-M); --merge M joins M shards.")
    _add_common(s)
    s.add_argument("--n", type=int, required=True, help="total number of frames (all shards)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--shard", default=None, help="K/M: render part K (0-based) of M [0/1]")
    s.add_argument("--merge", type=int, default=None, metavar="M",
                   help="do not render: merge the outputs of M shards in --out")
    s.add_argument("--region-dir", default="0,0,1",
                   help="centre direction of the pose cone from the brain centre (world) [0,0,1]")
    s.add_argument("--cone-deg", type=float, default=60.0, help="half-angle of the cone [60]")
    s.add_argument("--tilt-deg", type=float, default=15.0, help="max tilt from the inward normal [15]")
    s.add_argument("--roll-deg", type=float, default=180.0,
                   help="rotation about the probe axis, uniform in +-this [180]")
    s.add_argument("--standoff-mm", type=float, default=0.5, help="probe face above the surface [0.5]")
    s.add_argument("--batch", type=int, default=32, help="frames per batch, rendered in one launch per kernel [32]")
    s.add_argument("--no-png", action="store_true", help="only the array file, no PNGs")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_synthesize)
    return s


def config_from_args(a) -> SynthesisConfig:
    try:
        rdir = tuple(float(v) for v in str(a.region_dir).split(","))
    except ValueError:
        raise ValueError(f"--region-dir must be 'x,y,z', got {a.region_dir!r}") from None
    if len(rdir) != 3:
        raise ValueError(f"--region-dir must be 'x,y,z', got {a.region_dir!r}")
    over = {k: getattr(a, k) for k in ("lines", "samples", "depth_mm", "fov_deg", "radius_mm",
                                       "width_mm", "frequency_mhz") if getattr(a, k) is not None}
    over = {{"lines": "n_lines", "samples": "n_samples"}.get(k, k): v for k, v in over.items()}
    if a.image_px:
        over["image_px"] = (a.image_px, a.image_px)
    return SynthesisConfig(volume=a.volume, n=a.n, seed=a.seed, probe=a.probe,
                           probe_overrides=over or None, echo_model=a.echo_model,
                           mapping=a.mapping, gain_db=a.gain_db,
                           dynamic_range_db=a.dynamic_range_db, tgc_db_per_cm=a.tgc_db_per_cm,
                           speckle=not a.no_speckle,
                           region=PoseRegion(rdir, a.cone_deg, a.tilt_deg, a.roll_deg,
                                             a.standoff_mm),
                           png=not a.no_png, batch=a.batch)


def cmd_synthesize(a) -> int:
    if a.merge is not None:
        s = merge_shards(a.out, a.merge)
        print(json.dumps(s))
        return 0
    k, m = parse_shard(a.shard)
    cfg = config_from_args(a)
    s = Synthesizer(cfg, arch=a.arch).run(a.out, k, m, progress=False if a.no_progress else None)
    print(json.dumps(s))
    return 0
