"""Learn the MRI -> acoustics mapping from (probe pose, ultrasound image) pairs by
backpropagation through the renderer.

    pairs = make_synthetic_pairs("brain", probe, hidden_mapping, n=20, seed=0)
    mapping, hist = fit_mapping("brain", pairs, kind="transfer", iters=150)
    mapping.save("mapping.json")            # diffus-taichi render --mapping mapping.json

Parameters: the (K, 3) transfer-function knots [MRayl, dB/cm/MHz, scattering] (kind
``transfer``), the (T, 3) tissue-table rows (kind ``tissue``; ``fit`` selects the columns) or
the flat weights of a small MLP (kind ``mlp``, :mod:`~diffus_taichi.mlp_mapping`; ``fit``
selects which output rows learn, the hidden layers are shared; the impedance output bias, a
common log-impedance offset, is set after every step so that the support-weighted mean log
impedance keeps its initial value: the unobservable gauge).
Each iteration sums d loss / d parameters over the pairs (``Simulator.value_and_grad(pose,
wrt=("pose", "mapping"))``), takes an Adam step (impedance in log units, attenuation and
scattering relative to their scale) and projects back onto the constraints: impedance >= 0.1
MRayl and, for transfer functions, non-decreasing in intensity (isotonic regression); attenuation
and scattering >= 0.

Identifiability (read before trusting fitted values):

* Impedance enters the images only through reflection coefficients (z1 - z0) / (z1 + z0),
  which are invariant to a common factor: the absolute impedance scale is **not observable**.
  The fit fixes this gauge (``anchor``): by default ("mean") the data-weighted geometric mean of
  the impedance knots keeps its initial value, so only the contrasts are learnt; an integer pins
  that knot/row to its initial value. Compare fitted and true impedances up to a common factor.
* A knot is constrained by the data only if intensities near it occur in the sampled voxels:
  ``knot_support`` gives, per knot, the mean hat-function weight over every ray sample of every
  pair (``history["support"]``); knots below ``min_support`` (default 1 %) are reported as
  unconstrained and get no optimiser steps (they only follow the monotone projection and the
  impedance gauge), unless ``fit_unsupported=True``.
* Use a loss that keeps absolute brightness (``mse`` on the [0, 1] image) to fit attenuation and
  scattering: NCC discards gain and offset, so the scattering level and TGC-like attenuation
  trends become ambiguous.
* Speckle: a matched forward model (the same coherent scatterer seed as the target images, as in
  :func:`make_synthetic_pairs`) makes the problem well-posed; for real images use
  ``speckle="mean"`` (expected intensity) and expect a bias of a few dB.

Pairs format (``.npz``): ``poses`` (P, 6) [tx, ty, tz mm, rotation vector rad], ``images``
(P, H, W) fan images in the probe's geometry, optionally ``probe`` (JSON of the
:class:`~diffus_taichi.probe.Probe` fields), ``settings`` (JSON of the imaging settings and
``echo_model``), ``volume`` (name), ``true_mapping`` (JSON, synthetic data only). A directory of
``.npz`` files written by ``diffus-taichi render --save-npz`` (keys ``fan`` and
``pose_vector_mm_rad``) is read as well.
"""
from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import glob
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np

from .acoustics import T1_TRANSFER_KNOTS, AcousticMapping, get_mapping
from .pose import Pose
from .probe import Probe, get_probe
from .progress import Progress
from .volume import Volume, load_volume

log = logging.getLogger(__name__)

FIT_PROPS = ("impedance", "attenuation", "scattering")
MIN_IMPEDANCE = 0.1          # MRayl
SETTING_KEYS = ("gain_db", "dynamic_range_db", "tgc_db_per_cm", "speckle", "noise_cell_mm", "seed")


# ---------------------------------------------------------------------------------------------
# pairs
# ---------------------------------------------------------------------------------------------
@dataclass
class Pairs:
    """(pose, image) pairs with the acquisition settings needed to reproduce the images.

    poses: (P, 6) [tx, ty, tz mm, rotation vector rad]; images: (P, H, W) in [0, 1];
    probe: the probe (None: given separately); settings: ImagingSettings fields plus optional
    ``echo_model``; true_mapping: the mapping that made synthetic pairs (None for real data)."""

    poses: np.ndarray
    images: np.ndarray
    probe: Probe | None = None
    settings: dict = field(default_factory=dict)
    volume: str = ""
    true_mapping: AcousticMapping | None = None

    def __post_init__(self):
        self.poses = np.asarray(self.poses, dtype=np.float64).reshape(-1, 6)
        self.images = np.asarray(self.images, dtype=np.float32)
        if self.images.ndim == 2:
            self.images = self.images[None]
        if self.images.ndim != 3:
            raise ValueError(f"pairs: images must be (P, H, W), got shape {self.images.shape}")
        if len(self.poses) != len(self.images):
            raise ValueError(f"pairs: {len(self.poses)} poses but {len(self.images)} images")
        if len(self.poses) == 0:
            raise ValueError("pairs: no pairs")
        if not (np.all(np.isfinite(self.poses)) and np.all(np.isfinite(self.images))):
            raise ValueError("pairs: poses or images contain NaN or Inf")
        if self.probe is not None and tuple(self.probe.image_px) != self.images.shape[1:]:
            raise ValueError(f"pairs: images are {self.images.shape[1:]} but the probe's fan image "
                             f"is {tuple(self.probe.image_px)}")

    def __len__(self):
        return len(self.poses)

    def subset(self, idx) -> "Pairs":
        idx = np.atleast_1d(np.asarray(idx))
        return dataclasses.replace(self, poses=self.poses[idx], images=self.images[idx])

    def split(self, n_first: int) -> tuple["Pairs", "Pairs"]:
        """(first n_first pairs, the rest), e.g. training and held-out pairs."""
        return self.subset(np.arange(n_first)), self.subset(np.arange(n_first, len(self)))

    def save(self, path: str) -> None:
        d = {"poses": self.poses, "images": self.images.astype(np.float32),
             "settings": json.dumps(self.settings), "volume": self.volume}
        if self.probe is not None:
            d["probe"] = json.dumps(probe_to_dict(self.probe))
        if self.true_mapping is not None:
            d["true_mapping"] = json.dumps(self.true_mapping.to_dict())
        np.savez_compressed(path, **d)


def probe_to_dict(probe: Probe) -> dict:
    d = dataclasses.asdict(probe)
    d["image_px"] = list(probe.image_px)
    return d


def probe_from_any(spec) -> Probe:
    """Probe from a dict, a JSON string, a ``repr(Probe(...))`` string (as saved by ``render
    --save-npz``) or a preset name."""
    if isinstance(spec, Probe):
        return spec
    if isinstance(spec, dict):
        return Probe(**spec)
    s = str(spec).strip()
    if s.startswith("{"):
        return Probe(**json.loads(s))
    if s.startswith("Probe("):
        call = ast.parse(s, mode="eval").body
        if not isinstance(call, ast.Call) or call.args:
            raise ValueError(f"cannot read probe from {s[:80]!r}")
        return Probe(**{kw.arg: ast.literal_eval(kw.value) for kw in call.keywords})
    return get_probe(s)


def _str(v) -> str:
    return str(v.item() if isinstance(v, np.ndarray) else v)


def load_pairs(spec) -> Pairs:
    """Pairs from a :class:`Pairs`, a dict with ``poses``/``images``, a list of (pose, image),
    an ``.npz`` file (see the module doc) or a directory of ``render --save-npz`` files."""
    if isinstance(spec, Pairs):
        return spec
    if isinstance(spec, dict):
        d = dict(spec)
        return Pairs(d.pop("poses"), d.pop("images"), **d)
    if isinstance(spec, (list, tuple)):
        poses = [p.as_vector() if isinstance(p, Pose) else np.asarray(p, np.float64) for p, _ in spec]
        return Pairs(np.stack(poses), np.stack([np.asarray(im) for _, im in spec]))
    path = os.fspath(spec)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.npz")))
        if not files:
            raise FileNotFoundError(f"pairs directory {path!r} has no .npz files")
        poses, images, probe, settings = [], [], None, {}
        for f in files:
            with np.load(f, allow_pickle=False) as z:
                if "fan" in z and "pose_vector_mm_rad" in z:
                    images.append(z["fan"])
                    poses.append(z["pose_vector_mm_rad"])
                elif "image" in z and "pose" in z:
                    images.append(z["image"])
                    poses.append(z["pose"])
                else:
                    raise ValueError(f"pairs file {f!r}: needs keys fan + pose_vector_mm_rad "
                                     "(render --save-npz) or image + pose")
                if probe is None and "probe" in z:
                    probe = probe_from_any(_str(z["probe"]))
                if "echo_model" in z:
                    settings["echo_model"] = _str(z["echo_model"])
        return Pairs(np.stack(poses), np.stack(images), probe=probe, settings=settings)
    if not os.path.exists(path):
        raise FileNotFoundError(f"pairs file not found: {path!r}")
    with np.load(path, allow_pickle=False) as z:
        if "poses" not in z or "images" not in z:
            raise ValueError(f"pairs file {path!r}: needs arrays 'poses' (P, 6) and 'images' (P, H, W)")
        kw = {}
        if "probe" in z:
            kw["probe"] = probe_from_any(_str(z["probe"]))
        if "settings" in z:
            kw["settings"] = json.loads(_str(z["settings"]))
        if "volume" in z:
            kw["volume"] = _str(z["volume"])
        if "true_mapping" in z:
            d = json.loads(_str(z["true_mapping"]))
            kw["true_mapping"] = AcousticMapping(kind=d["kind"], knots=d.get("knots"),
                                                 overrides=d.get("overrides", {}))
        return Pairs(z["poses"], z["images"], **kw)


# ---------------------------------------------------------------------------------------------
# geometry helpers
# ---------------------------------------------------------------------------------------------
def _sample_points_index(volume: Volume, probe: Probe, poses, line_stride=1, sample_stride=1):
    """Voxel-index positions (P, L, S, 3) of the ray samples of every pose."""
    o, d = probe.line_geometry()
    dep = probe.sample_depths_mm()
    o, d = o[::line_stride], d[::line_stride]
    dep = dep[::sample_stride]
    pts = o[:, None, :] + dep[None, :, None] * d[:, None, :]
    out = []
    for v in np.asarray(poses).reshape(-1, 6):
        out.append(volume.world_to_index(Pose.from_vector(v).probe_to_world(pts)))
    return np.stack(out)


def crop_box(volume: Volume, probe: Probe, poses, margin: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Voxel index box [lo, hi) holding every ray sample of ``poses`` plus ``margin`` voxels
    (clipped to the grid). The extremes of a line's samples are its first and last sample."""
    o, d = probe.line_geometry()
    ends = np.stack([o, o + probe.depth_mm * d], 1)
    idx = []
    for v in np.asarray(poses).reshape(-1, 6):
        idx.append(volume.world_to_index(Pose.from_vector(v).probe_to_world(ends)).reshape(-1, 3))
    idx = np.concatenate(idx)
    shape = np.array(volume.shape)
    lo = np.clip(np.floor(idx.min(0)).astype(int) - margin, 0, shape - 1)
    hi = np.clip(np.ceil(idx.max(0)).astype(int) + margin + 1, 1, shape)
    if np.any(hi - lo < 2):          # fan entirely outside: keep a 2-voxel corner (background)
        lo = np.minimum(lo, shape - 2)
        hi = np.maximum(hi, lo + 2)
    return lo, hi


def crop_volume(volume: Volume, probe: Probe, poses, margin: int = 2, channels=None) -> Volume:
    """The part of ``volume`` that the rays of ``poses`` can read (their bounding box plus
    ``margin`` voxels, within the grid), optionally only some ``channels``. Rendering it gives
    exactly the images of the full volume (samples beyond the grid still see the background)."""
    lo, hi = crop_box(volume, probe, poses, margin)
    names = volume.channel_names if channels is None else tuple(channels)
    ci = [volume.channel_names.index(n) for n in names]
    data = volume.channels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]][..., ci]
    shift = np.eye(4)
    shift[:3, 3] = lo
    return Volume(data, volume.affine @ shift, names, name=volume.name,
                  default_pose=volume.default_pose, meta=dict(volume.meta, crop=(lo.tolist(), hi.tolist())))


def _channels_for(mapping: AcousticMapping, volume: Volume):
    if mapping.kind == "transfer":
        return ("intensity",)
    return volume.channel_names


def knot_support(volume, probe: Probe, poses, n_knots: int, line_stride: int = 1,
                 sample_stride: int = 1) -> np.ndarray:
    """(K,) mean weight of each transfer-function knot over every ray sample of every pose: the
    hat-function weights of the voxel intensities, trilinearly interpolated at the samples as
    the renderer does (they sum to the fraction of samples inside the volume)."""
    from .simulator import sample_trilinear_np

    volume = load_volume(volume)
    vc = crop_volume(volume, probe, poses, channels=("intensity",))
    x = np.clip(vc.channels[..., 0].astype(np.float64), 0, 1) * (n_knots - 1)
    idx = _sample_points_index(vc, probe, poses, line_stride, sample_stride)
    w = np.zeros(n_knots)
    for k in range(n_knots):
        hat = np.clip(1.0 - np.abs(x - k), 0.0, 1.0)
        w[k] = sample_trilinear_np(hat, idx).mean()
    return w


def table_support(volume, probe: Probe, poses, mapping: AcousticMapping) -> np.ndarray:
    """(T,) mean tissue fraction of each tissue-table row over the ray samples (row 0, the
    background, gets the rest)."""
    from .simulator import sample_trilinear_np

    volume = load_volume(volume)
    rows, chan, names = mapping.table_arrays(volume)
    vc = crop_volume(volume, probe, poses)
    idx = _sample_points_index(vc, probe, poses)
    w = np.zeros(len(names))
    for c, t in enumerate(chan):
        if t >= 0:
            w[t] += sample_trilinear_np(vc.channels[..., c].astype(np.float64), idx).mean()
    w[0] = max(0.0, 1.0 - w[1:].sum())
    return w


# ---------------------------------------------------------------------------------------------
# projection and parameterisation
# ---------------------------------------------------------------------------------------------
def isotonic(y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Least-squares projection of ``y`` onto non-decreasing sequences (pool adjacent
    violators), with optional positive weights."""
    y = np.asarray(y, dtype=np.float64)
    w = np.ones_like(y) if w is None else np.asarray(w, dtype=np.float64)
    vals, wts, cnt = [], [], []
    for yi, wi in zip(y, w):
        vals.append(yi)
        wts.append(wi)
        cnt.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            wsum = wts[-2] + wts[-1]
            v = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / wsum
            c = cnt[-2] + cnt[-1]
            vals[-2:], wts[-2:], cnt[-2:] = [v], [wsum], [c]
    return np.repeat(vals, cnt)


def project_params(P: np.ndarray, kind: str, ref_log_z: float | None = None,
                   anchor_w: np.ndarray | None = None) -> np.ndarray:
    """Constraints: impedance >= MIN_IMPEDANCE, non-decreasing for transfer functions, gauge
    (weighted mean log impedance = ref_log_z); attenuation, scattering >= 0."""
    P = np.array(P, dtype=np.float64)
    logz = np.log(np.maximum(P[:, 0], MIN_IMPEDANCE))
    if kind == "transfer":
        logz = isotonic(logz)
    if ref_log_z is not None and anchor_w is not None:
        logz += ref_log_z - float(anchor_w @ logz)
    P[:, 0] = np.maximum(np.exp(logz), MIN_IMPEDANCE)
    P[:, 1:] = np.maximum(P[:, 1:], 0.0)
    return P


class Adam:
    def __init__(self, shape, lr, b1=0.9, b2=0.999, eps=1e-12):
        self.m, self.v = np.zeros(shape), np.zeros(shape)
        self.lr, self.b1, self.b2, self.eps, self.t = lr, b1, b2, eps, 0

    def step(self, g, lr_scale=1.0):
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        mh = self.m / (1 - self.b1 ** self.t)
        vh = self.v / (1 - self.b2 ** self.t)
        return -self.lr * lr_scale * mh / (np.sqrt(vh) + self.eps)


# ---------------------------------------------------------------------------------------------
# simulators
# ---------------------------------------------------------------------------------------------
def _settings_kw(pairs: Pairs, settings: dict | None, speckle=None) -> tuple[dict, str]:
    s = {k: v for k, v in (pairs.settings or {}).items() if k in SETTING_KEYS}
    model = (pairs.settings or {}).get("echo_model", "primary")
    for k, v in (settings or {}).items():
        if v is None:
            continue
        if k == "echo_model":
            model = v
        elif k in SETTING_KEYS:
            s[k] = v
        else:
            raise ValueError(f"unknown imaging setting {k!r} (use {', '.join(SETTING_KEYS)}, echo_model)")
    if speckle is not None:
        s["speckle"] = speckle
    return s, model


def _make_sim(volume: Volume, probe: Probe, mapping: AcousticMapping, poses, settings: dict,
              echo_model: str, arch, requires_grad, crop: bool):
    from .simulator import Simulator

    vol = crop_volume(volume, probe, poses, channels=_channels_for(mapping, volume)) if crop else volume
    return Simulator(vol, probe=probe, mapping=mapping, echo_model=echo_model, arch=arch,
                     requires_grad=requires_grad, **settings)


def _target_selector(sim, images, loss: str):
    """``select(i)`` makes image i the loss target of ``sim`` (``set_loss`` reuses the loss
    fields when kind and shape are unchanged, so this is cheap)."""
    mask = sim.fan_mask()

    def select(i):
        sim.set_loss(images[i], loss, mask=mask)
    return select


def _cosine_scale(it: int, iters: int, final: float) -> float:
    """Step-size factor of iteration ``it``: cosine decay from 1 to ``final``."""
    frac = it / max(1, iters - 1)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * frac))


def _mean_loss(sim, select, poses) -> float:
    """Mean loss of ``sim`` over all pairs (``select(i)`` makes image i the target)."""
    total = 0.0
    for i, v in enumerate(poses):
        select(i)
        total += sim.loss(Pose.from_vector(v))
    return total / len(poses)


def _write_params(sim, kind, P):
    if kind == "mlp":
        sim.set_mapping_params(mlp=P)     # outside the volume stays the background tissue
        return
    if kind == "transfer":
        sim.set_mapping_params(knots=P)
    else:
        sim.set_mapping_params(table=P)
    # the background beyond the grid follows knot/row 0 (set_mapping_params leaves it alone)
    sim.set_outside(P[0])


def mapping_from_params(P: np.ndarray, kind: str, template: AcousticMapping,
                        volume: Volume) -> AcousticMapping:
    """An :class:`AcousticMapping` holding fitted parameters (knots, or tissue-table rows as
    overrides)."""
    if kind == "mlp":
        from .mlp_mapping import MLPParams

        m = template.mlp
        return AcousticMapping("mlp", table=template.table, background=template.background,
                               mlp=MLPParams(m.features, m.hidden, weights=np.asarray(P, np.float64)))
    if kind == "transfer":
        return AcousticMapping("transfer", table=template.table, knots=np.asarray(P, np.float64),
                               background=template.background, overrides=dict(template.overrides))
    _, _, names = template.table_arrays(volume)
    over = dict(template.overrides)
    for n, row in zip(names, np.asarray(P, np.float64)):
        over[n] = tuple(float(x) for x in row)
    return AcousticMapping("tissue", table=template.table, background=template.background, overrides=over)


# ---------------------------------------------------------------------------------------------
# synthetic pairs
# ---------------------------------------------------------------------------------------------
def random_poses(volume, n: int, seed: int = 0, around: Pose | None = None,
                 shift_mm=(4.0, 4.0, 1.5), rot_deg=(8.0, 8.0, 10.0)) -> np.ndarray:
    """(n, 6) poses jittered around ``around`` (default: the volume's default pose) in the
    probe frame: uniform shifts within +-shift_mm (lateral, elevation, axial >= 0, i.e. never
    lifted off the surface) and rotations within +-rot_deg about the probe axes."""
    volume = load_volume(volume)
    base = volume.default_pose if around is None else around
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        dt = rng.uniform(-1, 1, 3) * np.asarray(shift_mm, dtype=np.float64)
        dt[2] = abs(dt[2])
        dw = np.radians(rng.uniform(-1, 1, 3) * np.asarray(rot_deg, dtype=np.float64))
        out.append(base.moved(dt, dw).as_vector())
    return np.stack(out)


def perturbed_knots(base=T1_TRANSFER_KNOTS, pct: float = 3.0, seed: int = 0, columns=(0,),
                    keep_first: bool = True, tries: int = 1000) -> np.ndarray:
    """Knots with the given columns multiplied by (1 + u), u uniform in +-pct %, redrawn until
    the impedance stays non-decreasing (knot 0 kept when ``keep_first``: water)."""
    base = np.asarray(base, dtype=np.float64)
    rng = np.random.default_rng(seed)
    for _ in range(tries):
        k = base.copy()
        for c in columns:
            u = rng.uniform(-pct, pct, len(k)) / 100.0
            if keep_first:
                u[0] = 0.0
            k[:, c] *= 1.0 + u
        if np.all(np.diff(k[:, 0]) >= 0):
            return k
    raise ValueError(f"no monotone perturbation of {pct} % found in {tries} draws")


class PairRenderer:
    """Renders a fixed volume/probe/settings at many poses with exchangeable mappings, on one
    Simulator (cropped to the fans of ``poses``; every later pose must lie within that crop).

        r = PairRenderer("brain", probe, poses, hidden_mapping, settings={"seed": 1})
        targets = r.render()                    # (P, H, W) with the hidden mapping
        fitted_images = r.render(fitted_mapping, speckle="off")
    """

    def __init__(self, volume, probe, poses, mapping="transfer", settings: dict | None = None,
                 echo_model: str = "primary", arch=None, crop: bool = True,
                 requires_grad: bool = False):
        self.volume = load_volume(volume)
        self.probe = probe if isinstance(probe, Probe) else get_probe(probe)
        self.poses = np.asarray(poses, dtype=np.float64).reshape(-1, 6)
        mapping = get_mapping(mapping, self.volume)
        self.box = crop_box(self.volume, self.probe, self.poses) if crop else None
        self.sim = _make_sim(self.volume, self.probe, mapping, self.poses, dict(settings or {}),
                             echo_model, arch, requires_grad, crop)

    def check_poses(self, poses) -> None:
        """Raise ValueError if the fans of ``poses`` reach beyond the cropped region."""
        if self.box is not None:
            lo, hi = crop_box(self.volume, self.probe, poses)
            if not (np.all(lo >= self.box[0]) and np.all(hi <= self.box[1])):
                raise ValueError("poses outside the region this PairRenderer was cropped to; "
                                 "build it with all poses")

    def render(self, mapping=None, poses=None, **settings) -> np.ndarray:
        """(P, H, W) images at ``poses`` (default: the constructor's) with ``mapping`` (default:
        the current one), optionally with other imaging settings for this call (e.g.
        ``speckle="off", dynamic_range_db=120``)."""
        sim = self.sim
        if mapping is not None:
            sim.upload_mapping(get_mapping(mapping, sim.volume))
        poses = self.poses if poses is None else np.asarray(poses, dtype=np.float64).reshape(-1, 6)
        self.check_poses(poses)
        old = dataclasses.replace(sim.settings)
        try:
            for k, v in settings.items():
                if k not in SETTING_KEYS or k == "seed":
                    raise ValueError(f"PairRenderer.render: cannot change setting {k!r}")
                setattr(sim.settings, k, v)
            sim.settings.validate()
            return np.stack([sim.render(Pose.from_vector(v)) for v in poses])
        finally:
            sim.settings = old


def make_synthetic_pairs(volume, probe, mapping, n: int, seed: int = 0, poses=None,
                         speckle="coherent", echo_model: str = "primary", arch=None,
                         settings: dict | None = None, **pose_kw) -> Pairs:
    """Render ``n`` fan images of ``volume`` with a (hidden) ``mapping`` at random poses around
    the default pose (``random_poses(..., seed=seed, **pose_kw)``) or at ``poses``. The
    images use coherent speckle with scatterer seed ``settings['seed']`` (default 1): fitting
    with the same settings is a matched forward model."""
    volume = load_volume(volume)
    probe = probe if isinstance(probe, Probe) else get_probe(probe)
    mapping = get_mapping(mapping, volume)
    if poses is None:
        poses = random_poses(volume, n, seed=seed, **pose_kw)
    poses = np.asarray(poses, dtype=np.float64).reshape(-1, 6)
    s = {"seed": 1}
    s.update(settings or {})
    s["speckle"] = speckle
    images = PairRenderer(volume, probe, poses, mapping, s, echo_model, arch).render()
    return Pairs(poses, images, probe=probe, settings=dict(s, echo_model=echo_model),
                 volume=volume.name, true_mapping=mapping)


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
def image_ncc(a, b, mask=None) -> float:
    """Normalised cross-correlation of two images over ``mask`` (all pixels if None)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m = np.ones(a.shape, bool) if mask is None else np.asarray(mask, bool)
    x, y = a[m] - a[m].mean(), b[m] - b[m].mean()
    den = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else float("nan")


def render_pairs(volume, pairs, mapping, probe=None, settings: dict | None = None, arch=None,
                 speckle=None) -> np.ndarray:
    """(P, H, W) renders of ``volume`` with ``mapping`` at the poses of ``pairs``."""
    volume = load_volume(volume)
    pairs = load_pairs(pairs)
    probe = _probe_for(pairs, probe)
    mapping = get_mapping(mapping, volume)
    s, model = _settings_kw(pairs, settings, speckle)
    return PairRenderer(volume, probe, pairs.poses, mapping, s, model, arch).render()


def evaluate_mapping(volume, pairs, mapping, probe=None, settings: dict | None = None, arch=None,
                     speckle=None) -> np.ndarray:
    """(P,) NCC (inside the fan) between the pairs' images and renders with ``mapping``."""
    pairs = load_pairs(pairs)
    probe = _probe_for(pairs, probe)
    ims = render_pairs(volume, pairs, mapping, probe, settings, arch, speckle)
    mask = probe.scan_grid()[2]
    return np.array([image_ncc(a, b, mask) for a, b in zip(ims, pairs.images)])


def _probe_for(pairs: Pairs, probe) -> Probe:
    if probe is None:
        if pairs.probe is None:
            raise ValueError("no probe: the pairs carry none, pass probe=")
        probe = pairs.probe
    probe = probe if isinstance(probe, Probe) else get_probe(probe)
    if tuple(probe.image_px) != pairs.images.shape[1:]:
        raise ValueError(f"pairs images are {pairs.images.shape[1:]} but the probe's fan image is "
                         f"{tuple(probe.image_px)}")
    return probe


def compare_params(fitted: np.ndarray, true: np.ndarray, init: np.ndarray | None = None,
                   support: np.ndarray | None = None, min_support: float = 0.01,
                   floor: float = 0.1) -> dict:
    """Errors of fitted vs true parameters per knot/row and property.

    ``rel``: |fitted - true| / max(|true|, floor * max |true| of that property), i.e. relative,
    except for values near zero (e.g. 0.008 dB/cm/MHz for CSF) where it is relative to the
    property's scale; ``rel_impedance_aligned``: impedance error after the best common factor
    (geometric mean over the constrained knots), which reflection-only images cannot observe;
    ``constrained``: support >= min_support; ``*_init``: the same for ``init``."""
    fitted, true = np.asarray(fitted, np.float64), np.asarray(true, np.float64)
    con = np.ones(len(true), bool) if support is None else np.asarray(support) >= min_support
    den = np.maximum(np.abs(true), floor * np.abs(true).max(0, keepdims=True))
    den = np.where(den > 0, den, 1.0)

    def errs(P):
        P = np.asarray(P, np.float64)
        rel = np.abs(P - true) / den
        lr = np.log(P[:, 0]) - np.log(true[:, 0])
        scale = float(np.exp(lr[con].mean())) if con.any() else 1.0
        return rel, scale, np.abs(P[:, 0] / scale - true[:, 0]) / true[:, 0]

    rel, scale, al = errs(fitted)
    out = {"rel": rel, "constrained": con, "impedance_scale": scale, "rel_impedance_aligned": al}
    if init is not None:
        out["rel_init"], _, out["rel_impedance_aligned_init"] = errs(init)
    return out


# ---------------------------------------------------------------------------------------------
# the fit
# ---------------------------------------------------------------------------------------------
def fit_mapping(volume, pairs, probe=None, kind: str = "transfer", init=None, loss: str = "mse",
                iters: int = 120, lr: float = 0.01, fit=("impedance",), batch_size: int | None = None,
                settings: dict | None = None, speckle=None, anchor="mean", min_support: float = 0.01,
                lr_final: float = 0.05, fit_unsupported: bool = False, arch=None,
                crop: bool = True, seed: int = 0, progress=True, callback=None,
                renderer: "PairRenderer | None" = None):
    """Learn the mapping's parameters from (pose, image) pairs.

    Args:
        volume: built-in name, NIfTI path or Volume (the MRI the poses refer to).
        pairs: :class:`Pairs`, ``.npz`` path, directory, dict or list of (pose, image).
        probe: probe of the images (default: the one stored with the pairs).
        kind: ``transfer`` (intensity knots), ``tissue`` (tissue-table rows) or ``mlp`` (MLP
            weights); ignored when ``init`` is an AcousticMapping/JSON.
        init: initial mapping (AcousticMapping, JSON path, or None for the defaults of ``kind``).
        loss: image loss (``mse`` keeps absolute brightness; ``ncc`` does not).
        iters: Adam iterations; each sums the gradient over ``batch_size`` pairs (all if None).
        lr: Adam step for log-impedance (1 = e-fold) and for attenuation/scattering relative to
            their initial scale; cosine-decayed to ``lr * lr_final``.
        fit: properties to learn, any of ``impedance``, ``attenuation``, ``scattering``.
        settings: imaging settings (ImagingSettings fields, ``echo_model``) overriding the pairs'.
        speckle: override the speckle mode (default: the pairs' setting, i.e. matched model).
        anchor: impedance gauge: ``"mean"`` (support-weighted mean log impedance kept), a
            knot/row index (kept at its initial value) or None (free).
        min_support, fit_unsupported: knots/rows whose support (see :func:`knot_support`) is
            below ``min_support`` get no Adam steps unless ``fit_unsupported`` (Adam's normalised
            steps would otherwise random-walk them on vanishing gradients); they still follow
            the monotone projection and the impedance gauge.
        crop: render only the bounding box of the fans (identical images, much faster).
        progress: progress bar (True: when stderr is a terminal; "force"; False).
        callback: ``callback(it, loss, params)`` after every iteration.
        renderer: fit on this :class:`PairRenderer`'s Simulator (built with
            ``requires_grad=True`` over these poses) instead of building one: saves the JIT
            compilation when the same renderer made or evaluates the images. Its probe,
            settings and volume are used (``volume`` may be None); they must match the pairs'.

    Returns:
        (AcousticMapping, history) with history keys ``loss`` (per iteration, mean over the
        batch, before the step), ``params`` (per iteration), ``t_iter`` (seconds since the
        start, per iteration), ``init``, ``final_loss`` (all
        pairs), ``support`` (per knot/row), ``constrained``, ``seconds``, ``s_per_iter``.
    """
    t0 = time.perf_counter()
    fit = (fit,) if isinstance(fit, str) else tuple(fit)
    bad = [f for f in fit if f not in FIT_PROPS]
    if bad or not fit:
        raise ValueError(f"fit must name some of {', '.join(FIT_PROPS)}, got {fit!r}")
    if loss not in ("mse", "ncc", "lncc", "lc2"):
        raise ValueError(f"unknown loss {loss!r}")
    if iters < 0 or not (lr > 0):
        raise ValueError("iters must be >= 0 and lr > 0")
    pairs = load_pairs(pairs)
    if renderer is not None:
        volume = renderer.volume if volume is None else load_volume(volume)
        probe = renderer.probe if probe is None else probe
    volume = load_volume(volume)
    probe = _probe_for(pairs, probe)
    # a copy: the Simulator writes the fitted parameters into its mapping, not the caller's
    mapping0 = copy.deepcopy(get_mapping(kind if init is None else init, volume))
    kind = mapping0.kind
    s, model = _settings_kw(pairs, settings, speckle)
    if renderer is None:
        sim = _make_sim(volume, probe, mapping0, pairs.poses, s, model, arch, True, crop)
    else:
        sim = renderer.sim
        if sim.requires_grad is not True:
            raise ValueError("renderer: build the PairRenderer with requires_grad=True")
        rv = renderer.volume
        same_volume = rv is volume or (rv.name, rv.shape) == (volume.name, volume.shape)
        if renderer.probe != probe or not same_volume:
            raise ValueError("renderer: its probe and volume must be those of the fit")
        bad = [k for k, v in s.items() if getattr(sim.settings, k) != v]
        if bad or sim.echo_model != model:
            raise ValueError(f"renderer: imaging settings differ from the pairs' ({bad or 'echo_model'})")
        renderer.check_poses(pairs.poses)
        sim.upload_mapping(mapping0)
    if kind in ("transfer", "mlp"):
        if kind == "transfer":
            n_knots = len(mapping0.knots)
        else:   # the knots the MLP started from (T1 default, or e.g. the T2 table)
            k0 = getattr(mapping0.mlp, "init_knots", None)
            n_knots = len(T1_TRANSFER_KNOTS if k0 is None else k0)
        support = knot_support(volume, probe, pairs.poses, n_knots,
                               line_stride=max(1, probe.n_lines // 64),
                               sample_stride=max(1, probe.n_samples // 128))
    else:
        support = table_support(volume, probe, pairs.poses, mapping0)
    constrained = support >= min_support

    select = _target_selector(sim, pairs.images, loss)
    if kind == "mlp":
        return _fit_mlp(sim, pairs, select, mapping0, volume, fit, iters, lr, lr_final,
                        batch_size, seed, progress, callback, support, constrained, t0)

    P = (np.array(mapping0.knots, dtype=np.float64) if kind == "transfer"
         else mapping0.table_arrays(sim.volume)[0].astype(np.float64))
    P0 = P.copy()
    cols = [FIT_PROPS.index(f) for f in fit]
    scale = np.ones(3)
    for c in (1, 2):
        scale[c] = max(float(np.abs(P0[:, c]).max()), 0.05 if c == 1 else 0.02)
    if anchor == "mean":
        aw = np.where(constrained, support, 0.0)
        aw = aw / aw.sum() if aw.sum() > 0 else np.full(len(P), 1.0 / len(P))
    elif anchor is None:
        aw = None
    else:
        aw = np.zeros(len(P))
        aw[int(anchor)] = 1.0
    fit_z = 0 in cols
    ref = float(aw @ np.log(P0[:, 0])) if (aw is not None and fit_z) else None

    def to_theta(P):
        th = P.copy()
        th[:, 0] = np.log(P[:, 0])
        th[:, 1:] = P[:, 1:] / scale[1:]
        return th

    def from_theta(th):
        Q = th.copy()
        Q[:, 0] = np.exp(th[:, 0])
        Q[:, 1:] = th[:, 1:] * scale[1:]
        return Q

    mask = np.zeros_like(P, dtype=bool)          # fitted properties (columns)
    mask[:, cols] = True
    step_mask = mask & (constrained[:, None] | bool(fit_unsupported))   # rows Adam moves
    theta = to_theta(P)
    opt = Adam(theta.shape, lr)
    rng = np.random.default_rng(seed)
    n = len(pairs)
    bs = n if not batch_size else min(int(batch_size), n)
    gkey = "knots" if kind == "transfer" else "table"
    hist = {"loss": [], "params": [], "init": P0.copy(), "t_iter": []}

    def loss_and_grad(idx):
        tot, G = 0.0, np.zeros_like(P)
        for i in idx:
            select(i)
            v, g = sim.value_and_grad(Pose.from_vector(pairs.poses[i]), wrt=("pose", "mapping"))
            tot += v
            G += g[gkey]
        return tot / len(idx), G / len(idx)

    enabled = None if progress is True else (progress == "force")
    with Progress(iters, f"fit {kind} mapping", enabled=enabled) as bar:
        for it in range(iters):
            idx = np.arange(n) if bs == n else rng.choice(n, bs, replace=False)
            val, G = loss_and_grad(idx)
            if not np.all(np.isfinite(G)):
                raise RuntimeError(f"non-finite mapping gradient at iteration {it}")
            gth = G.copy()
            gth[:, 0] *= P[:, 0]               # d/d log z
            gth[:, 1:] *= scale[1:]
            gth[~step_mask] = 0.0
            lr_scale = _cosine_scale(it, iters, lr_final)
            theta = theta + np.where(step_mask, opt.step(gth, lr_scale), 0.0)
            P = np.where(mask, project_params(from_theta(theta), kind, ref, aw), P0)
            theta = to_theta(P)
            _write_params(sim, kind, P)
            hist["loss"].append(val)
            hist["params"].append(P.copy())
            hist["t_iter"].append(time.perf_counter() - t0)
            bar.update(1, loss=val)
            if callback is not None:
                callback(it, val, P)
    hist.update(final_loss=_mean_loss(sim, select, pairs.poses), support=support, constrained=constrained, fit=fit,
                seconds=time.perf_counter() - t0, kind=kind, anchor=anchor,
                s_per_iter=(time.perf_counter() - t0) / max(1, iters))
    fitted = mapping_from_params(P, kind, mapping0, volume)
    log.info("mapping fit: %d pairs, %d iterations, loss %.4g -> %.4g, %.1f s", n, iters,
             hist["loss"][0] if hist["loss"] else float("nan"), hist["final_loss"], hist["seconds"])
    return fitted, hist


def _fit_mlp(sim, pairs, select, mapping0, volume, fit, iters, lr, lr_final, batch_size, seed,
             progress, callback, support, constrained, t0):
    """Adam on the flat MLP weights (see :func:`fit_mapping`); output rows of properties not in
    ``fit`` stay at their initial values. Gauge: after every step the impedance output bias (a
    common log-impedance offset, unobservable) is reset so that the support-weighted mean log
    impedance of the flat-tissue curve at the knot intensities keeps its initial value (as the
    transfer-function fit does); without it the hidden layers let the common scale drift."""
    from .mlp_mapping import flat_features

    mp = mapping0.mlp
    w0 = mp.weights.copy()
    H = mp.sizes[-2]
    o = mp.n_params - (3 * H + 3)
    out_w, out_b = np.arange(o, o + 3 * H).reshape(3, H), np.arange(o + 3 * H, o + 3 * H + 3)
    free = np.ones(mp.n_params, bool)
    free[out_b[0]] = False
    for c, name in enumerate(FIT_PROPS):
        if name not in fit:
            free[out_w[c]] = False
            free[out_b[c]] = False
    w = w0.copy()
    feats = flat_features(mp, np.linspace(0.0, 1.0, len(support)))
    aw = np.where(constrained, support, 0.0)
    aw = aw / aw.sum() if aw.sum() > 0 else np.full(len(support), 1.0 / len(support))

    def mean_log_z(wv):
        return float(aw @ np.log(mp.props(feats, wv)[:, 0]))
    ref_log_z = mean_log_z(w0)
    opt = Adam(w.shape, lr)
    rng = np.random.default_rng(seed)
    n = len(pairs)
    bs = n if not batch_size else min(int(batch_size), n)
    hist = {"loss": [], "params": [], "init": w0.copy(), "t_iter": []}
    enabled = None if progress is True else (progress == "force")
    with Progress(iters, "fit mlp mapping", enabled=enabled) as bar:
        for it in range(iters):
            idx = np.arange(n) if bs == n else rng.choice(n, bs, replace=False)
            val, G = 0.0, np.zeros_like(w)
            for i in idx:
                select(i)
                v, g = sim.value_and_grad(Pose.from_vector(pairs.poses[i]), wrt=("pose", "mapping"))
                val += v / len(idx)
                G += g["mlp"] / len(idx)
            if not np.all(np.isfinite(G)):
                raise RuntimeError(f"non-finite MLP gradient at iteration {it}")
            lr_scale = _cosine_scale(it, iters, lr_final)
            w = w + np.where(free, opt.step(np.where(free, G, 0.0), lr_scale), 0.0)
            if "impedance" in fit:     # log Z = log Z_REF + o0: the bias shifts it exactly
                w[out_b[0]] += ref_log_z - mean_log_z(w)
            _write_params(sim, "mlp", w)
            hist["loss"].append(val)
            hist["params"].append(w.copy())
            hist["t_iter"].append(time.perf_counter() - t0)
            bar.update(1, loss=val)
            if callback is not None:
                callback(it, val, w)
    hist.update(final_loss=_mean_loss(sim, select, pairs.poses), support=support, constrained=constrained, fit=fit,
                seconds=time.perf_counter() - t0, kind="mlp", anchor="mean",
                s_per_iter=(time.perf_counter() - t0) / max(1, iters))
    fitted = mapping_from_params(w, "mlp", mapping0, volume)
    log.info("MLP mapping fit: %d pairs, %d iterations, loss %.4g -> %.4g, %.1f s", n, iters,
             hist["loss"][0] if hist["loss"] else float("nan"), hist["final_loss"], hist["seconds"])
    return fitted, hist


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------
def format_table(fitted, true=None, init=None, support=None, min_support: float = 0.01,
                 names=None) -> str:
    """Text table of fitted (and true/initial) parameters per knot/row."""
    fitted = np.asarray(fitted)
    K = len(fitted)
    names = names or [f"{k / (K - 1):.2f}" for k in range(K)]
    cmp_ = compare_params(fitted, true, init, support, min_support) if true is not None else None
    lines = []
    hdr = f"{'knot':>6} {'support':>8} {'con':>3} | {'Z fit':>7}"
    if true is not None:
        hdr += f" {'Z true':>7} {'err%':>6} {'alig%':>6}"
        if init is not None:
            hdr += f" {'Z init':>7} {'i.err%':>6} {'i.alg%':>6}"
    hdr += f" | {'att fit':>7}" + (f" {'att tr':>7} {'err%':>6}" if true is not None else "")
    hdr += f" | {'sc fit':>7}" + (f" {'sc tr':>7} {'err%':>6}" if true is not None else "")
    lines.append(hdr)
    for k in range(K):
        sup = "" if support is None else f"{support[k]:8.4f}"
        con = "" if support is None else ("yes" if support[k] >= min_support else "no")
        row = f"{names[k]:>6} {sup:>8} {con:>3} | {fitted[k, 0]:7.4f}"
        if true is not None:
            row += (f" {true[k, 0]:7.4f} {100 * cmp_['rel'][k, 0]:6.2f}"
                    f" {100 * cmp_['rel_impedance_aligned'][k]:6.2f}")
            if init is not None:
                row += (f" {init[k, 0]:7.4f} {100 * cmp_['rel_init'][k, 0]:6.2f}"
                        f" {100 * cmp_['rel_impedance_aligned_init'][k]:6.2f}")
        for c in (1, 2):
            row += f" | {fitted[k, c]:7.4f}"
            if true is not None:
                row += f" {true[k, c]:7.4f} {100 * cmp_['rel'][k, c]:6.2f}"
        lines.append(row)
    if cmp_ is not None:
        lines.append(f"(err%: relative error (attenuation/scattering values below 10 % of the "
                     f"largest: relative to that); alig%: impedance error after the best common "
                     f"factor {cmp_['impedance_scale']:.4f}, which the images cannot observe; "
                     f"i.*: the initial knots; con: support >= {100 * min_support:.0f} %)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def cmd_fit_mapping(a) -> int:
    from .cli import _probe_from_args

    t0 = time.perf_counter()
    volume = load_volume(a.volume)
    overrides = dict(n_lines=a.lines, n_samples=a.samples, depth_mm=a.depth_mm, fov_deg=a.fov_deg,
                     radius_mm=a.radius_mm, width_mm=a.width_mm, frequency_mhz=a.frequency_mhz,
                     image_px=(a.image_px, a.image_px) if a.image_px else None)
    settings = {"gain_db": a.gain_db, "dynamic_range_db": a.dynamic_range_db,
                "tgc_db_per_cm": a.tgc_db_per_cm, "seed": a.seed,
                "echo_model": a.echo_model}
    if a.no_speckle:
        settings["speckle"] = "off"
    init = a.mapping if a.mapping not in (None, "auto") else a.kind
    if init == "mlp":
        from .mlp_mapping import MLPParams

        try:
            hidden_sizes = tuple(int(v) for v in a.mlp_hidden.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"--mlp-hidden: expected comma-separated integers, got {a.mlp_hidden!r}") from None
        feats = tuple(v.strip() for v in a.mlp_features.split(",") if v.strip())
        init = AcousticMapping("mlp", mlp=MLPParams(feats, hidden_sizes))
    held, renderer = None, None
    if a.synthetic:
        probe = _probe_from_args(argparse.Namespace(**dict(vars(a), probe=a.probe or "craniotomy")))
        hidden = (AcousticMapping.load(a.hidden) if a.hidden else
                  AcousticMapping("transfer", knots=perturbed_knots(pct=a.perturb_pct, seed=a.rng_seed)))
        fit_kind = get_mapping(init, volume).kind
        if fit_kind != hidden.kind and not (fit_kind == "mlp" and hidden.kind == "transfer"):
            raise ValueError(f"--synthetic: the hidden mapping is {hidden.kind!r}; fit the same "
                             "kind (or an mlp to a hidden transfer function)")
        s = {"seed": 1}
        s.update({k: v for k, v in settings.items() if v is not None and k != "echo_model"})
        s.setdefault("speckle", "coherent")
        model = a.echo_model or "primary"
        poses = random_poses(volume, a.synthetic + a.holdout, seed=a.rng_seed)
        # one Simulator makes the images, fits and evaluates (one JIT compilation)
        renderer = PairRenderer(volume, probe, poses, hidden, s, model, a.arch, requires_grad=True)
        all_pairs = Pairs(poses, renderer.render(), probe=probe, settings=dict(s, echo_model=model),
                          volume=volume.name, true_mapping=hidden)
        if a.pairs:
            all_pairs.save(a.pairs)
            log.info("wrote %d synthetic pairs to %s", len(all_pairs), a.pairs)
        pairs, held = all_pairs.split(a.synthetic)
        if fit_kind != hidden.kind:      # a Simulator cannot switch mapping kind: fit on another
            renderer = None
    else:
        if not a.pairs:
            raise ValueError("give --pairs FILE.npz|DIR (or --synthetic N)")
        pairs = load_pairs(a.pairs)
        base = pairs.probe if pairs.probe is not None else get_probe(a.probe or "craniotomy")
        ov = {k: v for k, v in overrides.items() if v is not None}
        probe = base.with_(**ov) if ov else base
        if a.holdout:
            if a.holdout >= len(pairs):
                raise ValueError(f"--holdout {a.holdout} leaves no pairs to fit ({len(pairs)} pairs)")
            pairs, held = pairs.split(len(pairs) - a.holdout)
    fit = tuple(f.strip() for f in a.fit.split(",") if f.strip())
    mapping, hist = fit_mapping(volume, pairs, probe=probe, init=init, kind=a.kind, loss=a.loss,
                                iters=a.iters, lr=a.lr, fit=fit, batch_size=a.batch,
                                settings=settings, arch=a.arch, progress=True, renderer=renderer)
    mapping.save(a.out)
    true = pairs.true_mapping
    names = None
    if hist["kind"] == "tissue":
        names = [n[:6] for n in mapping.table_arrays(volume)[2]]
    T = None
    if true is not None and (true.kind == hist["kind"] or (hist["kind"], true.kind) == ("mlp", "transfer")):
        T = np.asarray(true.knots) if true.kind == "transfer" else true.table_arrays(volume)[0]
    if hist["kind"] == "mlp":     # compare the MLP's flat-tissue curve at the knot intensities
        K = len(hist["support"])
        P = mapping.mlp.curve(K)[1]
        P_init = mapping_from_params(hist["init"], "mlp", mapping, volume).mlp.curve(K)[1]
    else:
        P = np.asarray(mapping.knots) if hist["kind"] == "transfer" else mapping.table_arrays(volume)[0]
        P_init = hist["init"]
    print(format_table(P, T, P_init, hist["support"], names=names))
    print(f"loss {hist['loss'][0] if hist['loss'] else float('nan'):.5g} -> {hist['final_loss']:.5g} "
          f"({len(pairs)} pairs, {a.iters} iterations, {hist['seconds']:.1f} s)")
    if held is not None and len(held):
        if renderer is not None:
            mask = probe.scan_grid()[2]
            ims = renderer.render(mapping, held.poses)
            ncc = np.array([image_ncc(x, y, mask) for x, y in zip(ims, held.images)])
        else:
            ncc = evaluate_mapping(volume, held, mapping, probe=probe, settings=settings, arch=a.arch)
        print(f"held-out NCC ({len(held)} pairs): min {ncc.min():.4f} mean {ncc.mean():.4f}")
    log.info("fit-mapping total %.1f s", time.perf_counter() - t0)
    print(a.out)
    return 0


def add_fit_parser(sub) -> None:
    """Register ``fit-mapping`` on the CLI's subparsers."""
    from .cli import _add_common

    f = sub.add_parser(
        "fit-mapping", help="learn the MRI -> acoustics mapping from (pose, image) pairs",
        description="Fit the transfer function (or tissue table) that maps MRI to acoustic "
                    "properties by backpropagation through the renderer, from (probe pose, "
                    "ultrasound image) pairs. Writes a mapping JSON for `render --mapping`. "
                    "Here --mapping is the initial mapping (default: the defaults of --kind); "
                    "probe and imaging settings stored with the pairs are used unless given "
                    "here (--lines/--samples may differ from the pairs'; the fan image size may "
                    "not). The "
                    "absolute impedance scale is unobservable (reflections are ratios): the "
                    "fit keeps the support-weighted mean log impedance of the initial mapping.")
    _add_common(f)
    f.set_defaults(probe=None, mapping=None, gain_db=None, dynamic_range_db=None, seed=None,
                   echo_model=None)
    f.add_argument("--pairs", default=None,
                   help="pairs .npz (poses (P,6) [mm, rotvec rad], images (P,H,W), optional probe/"
                        "settings JSON) or a directory of `render --save-npz` files; with "
                        "--synthetic: where to save the generated pairs")
    f.add_argument("--kind", default="transfer", choices=["transfer", "tissue", "mlp"],
                   help="mapping to fit when --mapping gives no initial one [transfer]")
    f.add_argument("--mlp-hidden", default="16",
                   help="--kind mlp: hidden layer sizes, comma separated (1-3 layers) [16]")
    f.add_argument("--mlp-features", default="intensity",
                   help="--kind mlp: comma list of intensity, local_mean, gradient_mm [intensity]")
    f.add_argument("--fit", default="impedance",
                   help="comma list of impedance, attenuation, scattering [impedance]")
    f.add_argument("--loss", default="mse", choices=["mse", "ncc", "lncc", "lc2"],
                   help="image loss; mse keeps absolute brightness [mse]")
    f.add_argument("--iters", type=int, default=120, help="Adam iterations [120]")
    f.add_argument("--lr", type=float, default=0.01,
                   help="Adam step (log impedance; attenuation/scattering relative) [0.01]")
    f.add_argument("--batch", type=int, default=None, help="pairs per iteration [all]")
    f.add_argument("--holdout", type=int, default=0,
                   help="keep the last N pairs (or N extra synthetic ones) out of the fit and "
                        "report their NCC [0]")
    f.add_argument("--synthetic", type=int, default=0,
                   help="generate N pairs from a hidden mapping (--hidden or the default T1 "
                        "knots with impedance perturbed by --perturb-pct) and fit them")
    f.add_argument("--hidden", default=None, help="hidden mapping JSON for --synthetic")
    f.add_argument("--perturb-pct", type=float, default=3.0,
                   help="impedance perturbation of the hidden knots for --synthetic [3]")
    f.add_argument("--rng-seed", type=int, default=0, help="random poses/perturbation seed [0]")
    f.add_argument("--out", default="mapping.json", help="output mapping JSON [mapping.json]")
    f.set_defaults(func=cmd_fit_mapping)
