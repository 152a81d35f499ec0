"""Gradient-based probe pose search: recover where an ultrasound image was taken.

    res = register("brain", target_image, init_pose, probe="craniotomy")
    res.pose, res.errors(), res.to_dict()

    ps = PoseSearch("brain", "craniotomy")          # reusable: build once, search many targets
    res = ps.run(target_image, init_pose)

Pipeline (defaults: :data:`DEFAULT_LEVELS`, tuned with benchmarks/bench_pose_search.py):

* The optimised variable is ``x = [ux, uy, uz (mm), ax, ay, az (degrees)]``: a translation along
  the axes of a reference probe pose and a rotation vector in that probe frame about a pivot on
  the probe axis (default: half the imaging depth, the middle of the fan). Rotating about the
  middle of the image rather than the probe face decouples rotation from translation, and the
  local chart has no singularity whatever the absolute orientation (rotation vectors near
  180 deg are common for probes looking down). Gradients come from
  :meth:`Simulator.value_and_grad` through the Jacobian of this chart.
* Levels render with ``speckle='mean'`` (expected intensity, smooth in the pose). With coherent
  speckle the loss has a needle-sharp minimum (< 1 mm / 1 deg wide) in a landscape of speckle
  noise, useless for descent.
* The 'mean' render is not the expected look of a coherent-speckle image (log of the mean vs
  mean of the log, depth-dependent beam energy): optimising the plain loss lands 1-3 deg (up to
  8 deg) off even for a target rendered by the same model. Each level therefore corrects the
  target by a *bias map*: the mean of ``bias_seeds`` coherent renders (other scatterer seeds)
  minus the level's 'mean' render, both at the level's starting pose, either averaged per depth
  (``'depth'``: anatomy-agnostic, for the far starts of the coarsest level) or per pixel
  (``'map'``: re-estimated at the pose reached, ``repeats`` times, at the fine level).
* The coarsest level runs ``n_starts`` starts (the initial pose, +-start along the
  out-of-plane axes, which are the multi-modal ones, then random points of the +-start box)
  with successive halving: all run ``screen_iters`` Adam steps, the better half twice as many,
  ... until ``keep`` remain; they finish the level and the best one goes on.
* Adam with a cosine step decay and stall detection (``patience``); L-BFGS optionally.
* Restart rule (``attempts``, ``restart_ratio``): far from the truth the similarity is nearly
  flat, the basin of the true pose at the coarsest level is a few mm / deg wide, and from the
  largest offsets (+-10 mm and +-10 deg on every axis) no start may fall into it; the search
  then ends in a wrong minimum whose loss is well above what a right answer gives. That value
  is predicted at the pose found by :meth:`PoseSearch.match_loss` (the finest level's loss
  against a fresh coherent render at that pose, i.e. the loss had the pose been right, speckle
  decorrelation included). If the loss found exceeds ``restart_ratio`` times it, the search
  starts again from random starts in a wider box (x ``sample_box``) pre-screened by the loss
  alone (:meth:`PoseSearch.sample_starts`: cross-entropy sampling rounds, a few times cheaper
  per point than a gradient step, homing in on low-loss regions), and keeps the better result;
  it stops early when two rounds end at the same pose (within 1 mm / 1 deg): then the model
  mismatch, not the search, keeps the loss above the prediction.
  Measured on the benchmark (seeds 1-3): right answers end at 0.97-1.15 x the prediction with
  a target of the same model and 1.1-1.4 x with a mismatched one (other impedances, noise);
  wrong minima at 1.9-3 x (earlier scatterer model) and 9-30 x (current one).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .pose import Pose, matrix_to_rotvec, rotvec_to_matrix
from .probe import Probe, get_probe
from .progress import Progress

log = logging.getLogger(__name__)

DEG = math.pi / 180.0


@dataclass(frozen=True)
class Level:
    """One resolution level: probe lines/samples/pixels scaled by ``scale``; Gaussian blur
    (sigma, in fan pixels of this level) of render and target; at most ``iters`` evaluations;
    ``speckle`` of the render: 'mean' (expected intensity, smooth in the pose), 'coherent' or
    'off'; ``lr``: Adam step-size factor (x ``lr_mm`` / ``lr_deg`` of the search);
    ``bias``: correction of the target for the difference between the expected coherent image
    and the 'mean' render, estimated at the level's starting pose: 'map' (per pixel), 'depth'
    (per depth only: anatomy-agnostic, for far starts) or 'none'; ``repeats``: run the level
    this many times, re-estimating the correction at the pose reached."""

    scale: float = 1.0
    blur_px: float = 0.0
    iters: int = 30
    speckle: str = "mean"
    lr: float = 1.0
    bias: str = "none"
    repeats: int = 1


DEFAULT_LEVELS = (Level(0.25, 2.0, 60, "mean", 1.0, "depth"),
                  Level(0.5, 1.5, 30, "mean", 0.3, "map", 3))
DEFAULT_LOSS = "ncc"
DEFAULT_STARTS = 16
DEFAULT_SAMPLE_POINTS = 96      # loss-only samples per round of the start pre-screen
DEFAULT_SAMPLE_ROUNDS = 3
LOSS_NAMES = ("mse", "ncc", "lncc", "lc2")   # = losses.LOSSES (importing it loads taichi)


@dataclass
class SearchResult:
    pose: Pose
    loss: float
    loss_history: list = field(default_factory=list)
    level_of_iteration: list = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0
    start_losses: list = field(default_factory=list)
    true_pose: Pose | None = None
    init_pose: Pose | None = None
    sample_evaluations: int = 0      # loss-only evaluations of the start pre-screen
    attempts: int = 1                # multi-start rounds (restarts + 1)
    match_loss: float = math.nan     # restart rule's predicted loss (at the last restart check)
    attempt_poses: list = field(default_factory=list)    # result of every round
    attempt_losses: list = field(default_factory=list)

    def errors(self) -> tuple[float, float] | None:
        """(translation error mm, rotation error deg) to the true pose, if known."""
        return None if self.true_pose is None else self.pose.error_to(self.true_pose)

    def to_dict(self) -> dict:
        d = {"pose": self.pose.to_string(), "pose_vector_mm_rad": self.pose.as_vector().tolist(),
             "pose_matrix": self.pose.matrix.tolist(), "loss": self.loss,
             "loss_history": [float(v) for v in self.loss_history],
             "level_of_iteration": [int(v) for v in self.level_of_iteration],
             "iterations": self.iterations, "sample_evaluations": self.sample_evaluations,
             "attempts": self.attempts,
             "match_loss": None if math.isnan(self.match_loss) else self.match_loss,
             "attempt_poses": [p.to_string() for p in self.attempt_poses],
             "attempt_losses": [float(v) for v in self.attempt_losses],
             "seconds": self.seconds,
             "start_losses": [float(v) for v in self.start_losses]}
        if self.init_pose is not None:
            d["init_pose"] = self.init_pose.to_string()
        if self.true_pose is not None:
            et, er = self.errors()
            d.update(true_pose=self.true_pose.to_string(), translation_error_mm=et,
                     rotation_error_deg=er)
        return d

    def save_json(self, path: str) -> None:
        with open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2)


# --- pose chart ---------------------------------------------------------------------------------
def _x_of(pose: Pose) -> np.ndarray:
    """Absolute [tx, ty, tz (mm), wx, wy, wz (deg)] of a pose (kept for callers of 0.x)."""
    v = pose.as_vector()
    return np.r_[v[:3], v[3:] / DEG]


def _pose_of(x: np.ndarray) -> Pose:
    return Pose.from_vector(np.r_[x[:3], x[3:] * DEG])


def _closest_rep(w: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Of the rotation vectors w and w - 2 pi w/|w| (the same rotation), the one nearer ``ref``."""
    th = float(np.linalg.norm(w))
    if th < math.pi - 0.5:
        return w
    alt = w * (1.0 - 2.0 * math.pi / th)
    return alt if np.linalg.norm(alt - ref) < np.linalg.norm(w - ref) else w


class _Frame:
    """Local chart around a reference pose: x = [u (mm, probe axes), a (deg, probe-frame rotation
    vector about the pivot (0, 0, pivot_mm))] -> pose vector [t (mm), w (rad)]."""

    def __init__(self, ref: Pose, pivot_mm: float):
        self.R0 = ref.rotation
        self.t0 = np.asarray(ref.translation_mm, dtype=np.float64)
        self.c = np.array([0.0, 0.0, float(pivot_mm)])
        self.w0 = np.asarray(ref.rotvec_rad, dtype=np.float64)

    def vec(self, x, ref_w=None) -> np.ndarray:
        Ra = rotvec_to_matrix(np.asarray(x[3:], dtype=np.float64) * DEG)
        R = self.R0 @ Ra
        t = self.t0 + self.R0 @ (self.c - Ra @ self.c + np.asarray(x[:3], dtype=np.float64))
        w = _closest_rep(matrix_to_rotvec(R), self.w0 if ref_w is None else ref_w)
        return np.r_[t, w]

    def pose(self, x) -> Pose:
        return Pose.from_vector(self.vec(x))

    def vec_and_jac(self, x, h=1e-4) -> tuple[np.ndarray, np.ndarray]:
        """Pose vector at x and its Jacobian d vec / d x (6 x 6; central differences, float64)."""
        x = np.asarray(x, dtype=np.float64)
        v = self.vec(x)
        J = np.empty((6, 6))
        for k in range(6):
            e = np.zeros(6)
            e[k] = h
            J[:, k] = (self.vec(x + e, v[3:]) - self.vec(x - e, v[3:])) / (2 * h)
        return v, J


# --- targets ------------------------------------------------------------------------------------
def resample_fan(img: np.ndarray, probe_from: Probe, probe_to: Probe) -> np.ndarray:
    """Bilinear resampling of a fan image between two probes of the same geometry but different
    pixel grids (mm coordinates; 0 outside)."""
    xf, zf = probe_from.fan_axes_mm()
    xt, zt = probe_to.fan_axes_mm()
    ci = np.interp(xt, xf, np.arange(len(xf)), left=-1, right=-1)
    ri = np.interp(zt, zf, np.arange(len(zf)), left=-1, right=-1)
    R, C = np.meshgrid(ri, ci, indexing="ij")
    ok = (R >= 0) & (C >= 0)
    R0 = np.clip(np.floor(R).astype(int), 0, len(zf) - 2)
    C0 = np.clip(np.floor(C).astype(int), 0, len(xf) - 2)
    fr, fc = np.clip(R - R0, 0, 1), np.clip(C - C0, 0, 1)
    out = ((1 - fr) * (1 - fc) * img[R0, C0] + (1 - fr) * fc * img[R0, C0 + 1]
           + fr * (1 - fc) * img[R0 + 1, C0] + fr * fc * img[R0 + 1, C0 + 1])
    return np.where(ok, out, 0.0)


# --- optimisers ---------------------------------------------------------------------------------
class _Adam:
    """Adam with a cosine step decay (to 10 %) over ``iters`` and stall detection; resumable."""

    def __init__(self, x, lr, iters, patience, rel_tol):
        self.x = np.array(x, dtype=np.float64)
        self.lr, self.iters, self.patience, self.rel_tol = lr, max(1, iters), patience, rel_tol
        self.m, self.v, self.t = np.zeros(6), np.zeros(6), 0
        self.best_x, self.best_l, self.since = self.x.copy(), math.inf, 0
        self.done = False

    def run(self, ev, n):
        """At most ``n`` more evaluations ``ev(x) -> (loss, grad)``."""
        for _ in range(n):
            if self.done or self.t >= self.iters:
                self.done = True
                break
            loss, g = ev(self.x)
            if loss < self.best_l - self.rel_tol * abs(self.best_l):
                self.since = 0
            else:
                self.since += 1
            if loss < self.best_l:
                self.best_x, self.best_l = self.x.copy(), loss
            if self.since >= self.patience:
                self.done = True
                break
            self.t += 1
            self.m = 0.9 * self.m + 0.1 * g
            self.v = 0.999 * self.v + 0.001 * g * g
            mh, vh = self.m / (1 - 0.9 ** self.t), self.v / (1 - 0.999 ** self.t)
            decay = 0.5 * (1 + math.cos(math.pi * (self.t - 1) / self.iters))
            self.x = self.x - self.lr * (0.1 + 0.9 * decay) * mh / (np.sqrt(vh) + 1e-12)
        return self.best_x, self.best_l


def _lbfgs(ev, x, iters, lr, rel_tol, mem=6):
    """L-BFGS with Armijo backtracking; ``lr`` (mm, deg) scales the variables."""
    S, Y = [], []
    loss, g = ev(x)
    n_ev = 1
    scale = lr
    best_x, best_l = x.copy(), loss
    while n_ev < iters:
        q = g * scale
        alphas = []
        for s, y in reversed(list(zip(S, Y))):
            a = (s @ q) / (y @ s)
            alphas.append(a)
            q = q - a * y * scale
        if S:
            s, y = S[-1], Y[-1]
            q = q * (s @ y) / (y @ (y * scale))
        for (s, y), a in zip(zip(S, Y), reversed(alphas)):
            b = (y @ q) / (y @ s)
            q = q + s * (a - b)
        d = -q
        if not S or g @ d >= 0:
            d = -g * scale / (np.abs(g * scale).max() + 1e-12) * lr
            S, Y = [], []
        step, done = 1.0, False
        for _ in range(6):
            xn = x + step * d
            ln, gn = ev(xn)
            n_ev += 1
            if ln < best_l:
                best_x, best_l = xn.copy(), ln
            if ln <= loss + 1e-4 * step * (g @ d):
                done = True
                break
            step *= 0.4
            if n_ev >= iters:
                break
        if not done:
            break
        s, y = xn - x, gn - g
        if s @ y > 1e-12:
            S.append(s)
            Y.append(y)
            S, Y = S[-mem:], Y[-mem:]
        rel = (loss - ln) / max(abs(loss), 1e-12)
        x, loss, g = xn, ln, gn
        if rel < rel_tol * 0.1:
            break
    return best_x, best_l


# --- search -------------------------------------------------------------------------------------
class PoseSearch:
    """Pose search for one volume, probe and echo model; reusable for many targets (building the
    level simulators and compiling their kernels takes seconds; later searches do not).

    Args:
        volume, probe, mapping, echo_model, arch, **sim_kwargs: as for :class:`Simulator`
            (``speckle`` is set per level).
        loss: mse | ncc | lncc | lc2. levels: coarse-to-fine :class:`Level` list.
        optimizer: ``adam`` or ``lbfgs``. lr_mm / lr_deg: Adam step sizes (x ``Level.lr``).
        patience / rel_tol: stop a level after ``patience`` evaluations without a relative loss
            improvement of ``rel_tol``.
        n_starts: starts at the coarsest level: the initial pose plus ``n_starts - 1`` random
            poses within +-start_mm (probe axes) and +-start_deg (probe-frame rotation vector
            about the pivot) of it; each runs ``screen_iters`` evaluations, the ``keep`` best
            continue through the coarsest level, the best of those through the finer levels.
        pivot_mm: depth of the rotation centre on the probe axis (default: half the depth).
        bias_seeds: coherent renders (speckle realisations) averaged to estimate the expected
            image for the target correction (:attr:`Level.bias`).
        attempts / restart_ratio: at most ``attempts`` multi-start rounds; another round runs
            while the final loss exceeds ``restart_ratio`` x :meth:`match_loss` (multi-start
            only, ``n_starts > 1``).
        sample_points / sample_rounds / sample_box: loss-only pre-screen of the starts of a
            restart (:meth:`sample_starts`; ``sample_points=0``: none); ``sample_first``: also
            of the first round.
    """

    def __init__(self, volume="brain", probe="craniotomy", loss=DEFAULT_LOSS, levels=DEFAULT_LEVELS,
                 optimizer="adam", lr_mm=1.0, lr_deg=1.0, mapping="auto", echo_model="primary",
                 arch=None, patience=15, rel_tol=1e-3, n_starts=DEFAULT_STARTS, start_mm=9.0,
                 start_deg=9.0, keep=2, screen_iters=6, pivot_mm=None, bias_seeds=8,
                 sample_points=DEFAULT_SAMPLE_POINTS, sample_rounds=DEFAULT_SAMPLE_ROUNDS,
                 sample_box=1.35, sample_first=False, attempts=3, restart_ratio=1.6,
                 **sim_kwargs):
        from .losses import LOSSES
        from .simulator import Simulator

        if optimizer not in ("adam", "lbfgs"):
            raise ValueError(f"optimizer must be 'adam' or 'lbfgs', got {optimizer!r}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
        if not levels:
            raise ValueError("levels: need at least one Level")
        for lv in levels:
            if not (0 < lv.scale <= 1) or lv.iters < 1 or lv.blur_px < 0 or lv.repeats < 1:
                raise ValueError(f"bad level {lv}: need 0 < scale <= 1, iters >= 1, blur_px >= 0, "
                                 "repeats >= 1")
            if lv.bias not in ("none", "depth", "map"):
                raise ValueError(f"bad level {lv}: bias must be 'none', 'depth' or 'map'")
        if int(n_starts) < 1 or int(keep) < 1:
            raise ValueError("n_starts and keep must be >= 1")
        self.probe = probe if isinstance(probe, Probe) else get_probe(probe)
        self.loss_kind, self.levels, self.optimizer = loss, tuple(levels), optimizer
        self.lr = np.array([lr_mm] * 3 + [lr_deg] * 3, dtype=np.float64)
        self.patience, self.rel_tol = int(patience), float(rel_tol)
        self.n_starts = int(n_starts)
        self.start_mm, self.start_deg = float(start_mm), float(start_deg)
        self.keep, self.screen_iters = int(keep), int(screen_iters)
        self.pivot_mm = 0.5 * self.probe.depth_mm if pivot_mm is None else float(pivot_mm)
        self.bias_seeds = int(bias_seeds)
        if int(sample_points) < 0 or int(sample_rounds) < 1 or not sample_box > 0:
            raise ValueError("sample_points must be >= 0, sample_rounds >= 1, sample_box > 0")
        self.sample_points, self.sample_rounds = int(sample_points), int(sample_rounds)
        self.sample_box = float(sample_box)
        self.sample_first = bool(sample_first)
        if int(attempts) < 1 or not restart_ratio > 0:
            raise ValueError("attempts must be >= 1 and restart_ratio > 0")
        self.attempts, self.restart_ratio = int(attempts), float(restart_ratio)
        self.agree_mm_deg = np.array([1.0, 1.0])
        sim_kwargs.pop("speckle", None)
        self._sim_kwargs = dict(mapping=mapping, echo_model=echo_model, arch=arch, **sim_kwargs)
        self.sims = []
        first = None
        for lv in self.levels:
            sim = Simulator(volume if first is None else None, probe=self.level_probe(lv),
                            mapping=mapping, echo_model=echo_model, arch=arch, requires_grad="pose",
                            share_volume_with=first, speckle=lv.speckle, **sim_kwargs)
            first = first or sim
            self.sims.append(sim)
        self.volume = first.volume
        self._render_sim = None
        self._targets = [None] * len(self.levels)     # level targets as given (resampled)
        self._cur = [None] * len(self.levels)         # as loaded (bias-corrected), unblurred
        self._mask = "fan"

    def level_probe(self, lv: Level) -> Probe:
        p = self.probe
        if lv.scale == 1.0:
            return p
        H, W = p.image_px
        return p.with_(n_lines=max(8, int(round(p.n_lines * lv.scale))),
                       n_samples=max(16, int(round(p.n_samples * lv.scale))),
                       image_px=(max(16, int(round(H * lv.scale))),
                                 max(16, int(round(W * lv.scale)))))

    def describe(self) -> dict:
        """Settings, for logs and benchmark records."""
        return {"loss": self.loss_kind, "optimizer": self.optimizer,
                "levels": [asdict(lv) for lv in self.levels],
                "level_probes": [[s.probe.n_lines, s.probe.n_samples, *s.probe.image_px]
                                 for s in self.sims],
                "lr_mm_deg": self.lr[[0, 3]].tolist(), "patience": self.patience,
                "rel_tol": self.rel_tol, "n_starts": self.n_starts, "start_mm": self.start_mm,
                "start_deg": self.start_deg, "keep": self.keep, "screen_iters": self.screen_iters,
                "pivot_mm": self.pivot_mm, "bias_seeds": self.bias_seeds,
                "sample_points": self.sample_points, "sample_rounds": self.sample_rounds,
                "sample_box": self.sample_box, "sample_first": self.sample_first,
                "attempts": self.attempts, "restart_ratio": self.restart_ratio}

    @property
    def render_sim(self):
        """Full-resolution, coherent-speckle, gradient-free simulator sharing the volume."""
        if self._render_sim is None:
            from .simulator import Simulator

            kw = {k: v for k, v in self._sim_kwargs.items() if k != "mapping"}
            self._render_sim = Simulator(None, probe=self.probe, requires_grad=False,
                                         share_volume_with=self.sims[0], speckle=True, **kw)
        return self._render_sim

    def render(self, pose: Pose) -> np.ndarray:
        """Full-resolution render with coherent speckle (the probe given to the constructor)."""
        return self.render_sim.render(pose)

    def expected_image(self, pose: Pose, n: int | None = None) -> np.ndarray:
        """Mean of ``n`` (default ``bias_seeds``) full-resolution coherent renders with different
        scatterer realisations: the expected look of a target taken at ``pose``."""
        rs = self.render_sim
        old = rs.settings.seed
        acc = np.zeros(self.probe.image_px)
        try:
            for k in range(n or self.bias_seeds):
                rs.settings.seed = 7919 + 104729 * k
                acc += rs.render(pose)
        finally:
            rs.settings.seed = old
        return acc / (n or self.bias_seeds)

    def bias_map(self, li: int, pose: Pose, expected: np.ndarray | None = None,
                 kind: str = "map") -> np.ndarray:
        """Expected coherent image minus the level's render at ``pose`` (level pixels; 0 outside
        the fan): per pixel (``map``) or averaged per depth (``depth``)."""
        sim = self.sims[li]
        if expected is None:
            expected = self.expected_image(pose)
        e = expected if sim.probe == self.probe else resample_fan(expected, self.probe, sim.probe)
        d = e - sim.render(pose)
        _, si, inside = sim.probe.scan_grid()
        if kind == "depth":
            nb = max(8, sim.probe.n_samples // 8)
            b = np.clip((si / (sim.probe.n_samples - 1) * nb).astype(int), 0, nb - 1)
            cnt = np.bincount(b[inside], minlength=nb)
            prof = np.bincount(b[inside], weights=d[inside], minlength=nb) / np.maximum(cnt, 1)
            d = prof[b]
        return np.where(inside, d, 0.0)

    def set_target(self, target: np.ndarray, mask="fan") -> None:
        """Load ``target`` (fan image of the full-resolution probe) into every level's loss
        (without bias correction; :meth:`run` applies that)."""
        target = np.asarray(target, dtype=np.float64)
        if target.ndim != 2 or target.shape != tuple(self.probe.image_px):
            raise ValueError(f"target image shape {target.shape} != probe fan image shape "
                             f"{tuple(self.probe.image_px)}")
        if not np.all(np.isfinite(target)):
            raise ValueError("target image contains NaN or Inf")
        if not (isinstance(mask, str) and mask == "fan") and mask is not None:
            mask = np.asarray(mask)
            if mask.shape != target.shape:
                raise ValueError(f"mask shape {mask.shape} != target shape {target.shape}")
        self._mask = mask
        for li, sim in enumerate(self.sims):
            tgt = target if sim.probe == self.probe else resample_fan(target, self.probe, sim.probe)
            self._targets[li] = tgt
            self._load(li, tgt)

    def _level_mask(self, li):
        sim, mask = self.sims[li], self._mask
        if isinstance(mask, str) and mask == "fan":
            return sim.fan_mask()
        if mask is None or sim.probe == self.probe:
            return mask
        return resample_fan(np.asarray(mask, dtype=np.float64), self.probe, sim.probe) > 0.5

    def _load(self, li: int, tgt: np.ndarray) -> None:
        """Put a level-resolution target into level ``li``'s loss (Simulator.set_loss reuses the
        loss fields, so no kernel is compiled again)."""
        lv, sim = self.levels[li], self.sims[li]
        self._cur[li] = tgt
        sim.set_loss(tgt, self.loss_kind, mask=self._level_mask(li), blur_px=lv.blur_px)

    def _correct(self, li: int, pose: Pose, expected=None):
        """Load level ``li``'s target corrected by its bias map at ``pose``; returns ``expected``
        (the full-resolution expected image, reusable at the same pose)."""
        kind = self.levels[li].bias
        if kind == "none":
            return expected
        if expected is None:
            expected = self.expected_image(pose)
        d = self.bias_map(li, pose, expected, kind)
        self._load(li, np.clip(self._targets[li] - d, 0.0, 1.0))
        return expected

    @staticmethod
    def start_points(n: int, start_mm: float, start_deg: float, rng, axes: bool = True) -> list:
        """Starting increments x (mm, deg; local chart of the initial pose): the initial pose,
        then +-start along the out-of-plane axes (elevation translation, tilt about the lateral
        axis, twist about the axial axis: the poorly constrained, multi-modal directions; the
        in-plane ones are found by descent from any of them), then uniform random points in
        the +-start box."""
        pts = [np.zeros(6)]
        for k, v in ((5, start_deg), (3, start_deg), (1, start_mm)) if axes else ():
            for sgn in (1.0, -1.0):
                e = np.zeros(6)
                e[k] = sgn * v
                pts.append(e)
        spread = np.r_[[start_mm] * 3, [start_deg] * 3]
        while len(pts) < n:
            pts.append(rng.uniform(-1, 1, 6) * spread)
        return pts[:n]

    def match_loss(self, pose: Pose, seed: int = 15485863) -> float:
        """Loss the finest level would reach at ``pose`` were it the true pose: its loss at
        ``pose`` against a coherent render at ``pose`` with another scatterer seed (corrected
        as targets are). Restores the current target afterwards."""
        li = len(self.levels) - 1
        rs = self.render_sim
        old = rs.settings.seed
        try:
            rs.settings.seed = int(seed)
            img = rs.render(pose).astype(np.float64)
        finally:
            rs.settings.seed = old
        sim, saved = self.sims[li], self._targets[li]
        self._targets[li] = img if sim.probe == self.probe else resample_fan(img, self.probe,
                                                                             sim.probe)
        try:
            expected = self._correct(li, pose)
            if self.levels[li].bias == "none":
                self._load(li, self._targets[li])
            return float(sim.loss(pose))
        finally:
            self._targets[li] = saved
            if self.levels[li].bias == "none":
                self._load(li, saved)
            else:
                self._correct(li, pose, expected)

    def sample_starts(self, loss_at, starts: list, n: int, start_mm: float, start_deg: float,
                      rng) -> tuple[list, int]:
        """Pre-screen by the loss alone (no gradient: a few times cheaper): ``sample_rounds``
        rounds of ``sample_points`` samples of the chart, the first uniform in the
        +-``sample_box`` x (start_mm, start_deg) box (plus ``starts``), the next ones Gaussian
        about the best eighth so far (cross-entropy method). Far from the truth the image
        similarity is nearly flat and its gradient points anywhere, but its value still falls
        towards the truth, so the samples home in on the basin descent needs.
        Returns the ``n`` best distinct points (x, mm / deg; the first start, x = 0, is kept)
        and the number of loss evaluations."""
        spread = np.r_[[start_mm] * 3, [start_deg] * 3] * self.sample_box
        pts = [np.asarray(x, dtype=np.float64) for x in starts]
        n_new = max(0, self.sample_points - len(pts))
        pts += [rng.uniform(-1, 1, 6) * spread for _ in range(n_new)]
        loss_many = getattr(loss_at, "many", None) or (lambda xs: [loss_at(x) for x in xs])
        losses = list(loss_many(pts))
        n_elite = max(4, self.sample_points // 8)
        for _ in range(self.sample_rounds - 1):
            order = np.argsort(losses)[:n_elite]
            elite = np.array([pts[i] for i in order])
            mu, sd = elite.mean(0), np.maximum(elite.std(0), 0.05 * spread)
            new = [mu + sd * rng.standard_normal(6) for _ in range(self.sample_points)]
            pts += new
            losses += list(loss_many(new))
        order = list(np.argsort(losses))
        chosen = [pts[0]]
        min_sep = 0.1 * spread
        for i in order:
            if len(chosen) >= n:
                break
            if all(np.any(np.abs(pts[i] - c) > min_sep) for c in chosen):
                chosen.append(pts[i])
        return chosen, len(pts)

    def warmup(self, target: np.ndarray) -> None:
        """Compile every level's kernels (forward and gradient) once, e.g. before timing."""
        self.set_target(target)
        pose = self.volume.default_pose
        self.expected_image(pose, 1)
        for sim in self.sims:
            sim.value_and_grad(pose)
            sim.loss(pose)
            sim.render(pose)

    # --- search ---------------------------------------------------------------------------------
    def run(self, target: np.ndarray, init_pose: Pose, n_starts: int | None = None,
            start_mm: float | None = None, start_deg: float | None = None, seed: int = 0,
            true_pose: Pose | None = None, mask="fan",
            progress: bool | None = None) -> SearchResult:
        """Search from ``init_pose`` (plus ``n_starts - 1`` random starts within ±start_mm,
        ±start_deg per probe axis; defaults from the constructor) for the pose whose render best
        matches ``target`` (fan image of the full-resolution probe)."""
        n_starts = self.n_starts if n_starts is None else int(n_starts)
        start_mm = self.start_mm if start_mm is None else float(start_mm)
        start_deg = self.start_deg if start_deg is None else float(start_deg)
        if n_starts < 1:
            raise ValueError(f"n_starts must be >= 1, got {n_starts}")
        if not isinstance(init_pose, Pose):
            raise TypeError(f"init_pose must be a Pose, got {type(init_pose).__name__}")
        t0 = time.perf_counter()
        self.set_target(target, mask)
        rng = np.random.default_rng(seed)
        starts = self.start_points(n_starts, start_mm, start_deg, rng)
        hist, start_losses = [], []
        lv0 = self.levels[0]
        keep = min(self.keep, n_starts)
        screen = min(self.screen_iters, lv0.iters) if n_starts > 1 else 0
        total, alive, b = n_starts * screen, n_starts, screen
        while n_starts > 1 and alive > keep:
            alive, nb = max(keep, (alive + 1) // 2), min(lv0.iters, 2 * b)
            total, b = total + alive * (nb - b), nb
        total += keep * (lv0.iters - b) + lv0.iters * (lv0.repeats - 1)
        total += sum(lv.iters * lv.repeats for lv in self.levels[1:])
        if self.optimizer == "lbfgs":
            total *= 2
        n_sample = 0
        if self.sample_points > 0 and n_starts > 1 and self.sample_first:
            n_sample = (max(self.sample_points, n_starts)
                        + self.sample_points * (self.sample_rounds - 1))
        total += n_sample

        with Progress(total, "pose search", enabled=progress) as bar:
            def evaluator(sim, fr, li):
                def ev(x):
                    v, J = fr.vec_and_jac(x)
                    loss, g = sim.value_and_grad(Pose.from_vector(v))
                    hist.append((loss, li))
                    bar.update(1, loss=loss)
                    return loss, J.T @ g["pose"]
                return ev

            def attempt(starts, sample):
                """Coarsest level from ``starts`` (pre-screened by sampling if ``sample``),
                then the finer levels from the best; returns (pose, loss, loss-only evals)."""
                start_losses.clear()
                n_sample = 0
                # level 0: screen the starts, continue the best ``keep``
                frame = _Frame(init_pose, self.pivot_mm)
                self._correct(0, init_pose)
                ev0 = evaluator(self.sims[0], frame, 0)
                lr0 = self.lr * lv0.lr
                if sample:
                    def loss_at(x):
                        loss = self.sims[0].loss(frame.pose(x))
                        bar.update(1, loss=loss)
                        return loss

                    def loss_many(xs):     # renders 16 poses per launch
                        ls = self.sims[0].loss_batch([frame.pose(x) for x in xs], batch=16)
                        bar.update(len(ls), loss=float(ls.min()))
                        return ls
                    loss_at.many = loss_many
                    starts, n_sample = self.sample_starts(loss_at, starts, n_starts, start_mm,
                                                          start_deg, rng)
                if self.optimizer == "adam":
                    runs = [_Adam(xs, lr0, lv0.iters, self.patience, self.rel_tol) for xs in starts]
                    if n_starts > 1:   # successive halving: screen all, halve, run longer, ...
                        budget = screen
                        while True:
                            for r in runs:
                                r.run(ev0, budget - r.t)
                            if not start_losses:
                                start_losses[:] = [float(r.best_l) for r in runs]
                            if len(runs) <= keep:
                                break
                            runs = sorted(runs, key=lambda r: r.best_l)
                            runs = runs[:max(keep, (len(runs) + 1) // 2)]
                            budget = min(lv0.iters, 2 * budget)
                    for r in runs:
                        r.run(ev0, lv0.iters)
                        if n_starts == 1:
                            start_losses.append(float(r.best_l))
                    best = min(runs, key=lambda r: r.best_l)
                    x_best, l_best = best.best_x, best.best_l
                else:
                    cands = []
                    for xs in starts:
                        xb, lb = _lbfgs(ev0, xs.copy(), screen or lv0.iters, lr0, self.rel_tol)
                        cands.append((lb, xb))
                        start_losses.append(float(lb))
                    cands = sorted(cands, key=lambda c: c[0])[:keep]
                    if n_starts > 1:
                        cands = [_lbfgs(ev0, xb, lv0.iters - screen, lr0, self.rel_tol)[::-1]
                                 for _, xb in cands]
                    l_best, x_best = min(cands, key=lambda c: c[0])
                pose = frame.pose(x_best)
                for _ in range(lv0.repeats - 1):
                    pose, l_best = self._descend(0, pose, evaluator)

                # finer levels: re-centre the chart and re-estimate the target correction
                for li in range(1, len(self.levels)):
                    for _ in range(self.levels[li].repeats):
                        pose, l_best = self._descend(li, pose, evaluator)
                return pose, l_best, n_sample

            pose, l_best, n_sample = attempt(starts, n_sample > 0)
            n_att = 1
            floor = math.nan
            tried = [(pose, float(l_best))]
            while n_att < self.attempts and n_starts > 1:
                # restart rule: the loss the finest level reaches when the pose is right is about
                # that of a fresh coherent render at the pose found (another speckle seed); far
                # above it, the search sits in a wrong minimum: try new, wider starts
                floor = self.match_loss(pose)
                if l_best <= self.restart_ratio * floor:
                    break
                log.info("pose search: loss %.4g > %.3g x %.4g expected for a match: restart",
                         l_best, self.restart_ratio, floor)
                kept = (pose, l_best, list(start_losses))
                s2 = self.start_points(n_starts, start_mm * self.sample_box,
                                       start_deg * self.sample_box, rng, axes=False)
                pose, l_best, ns = attempt(s2, self.sample_points > 0)
                tried.append((pose, float(l_best)))
                n_sample += ns
                n_att += 1
                agree = max(np.array(pose.error_to(kept[0])) / self.agree_mm_deg) < 1.0
                if kept[1] < l_best:
                    pose, l_best = kept[0], kept[1]
                    start_losses[:] = kept[2]
                if agree:   # independent starts found the same minimum: the model, not the
                    break   # search, keeps the loss above the prediction
        res = SearchResult(pose=pose, loss=float(l_best),
                           loss_history=[h[0] for h in hist],
                           level_of_iteration=[h[1] for h in hist],
                           iterations=len(hist), seconds=time.perf_counter() - t0,
                           start_losses=start_losses, true_pose=true_pose, init_pose=init_pose,
                           sample_evaluations=n_sample, attempts=n_att, match_loss=floor,
                           attempt_poses=[t[0] for t in tried],
                           attempt_losses=[t[1] for t in tried])
        if true_pose is not None:
            et, er = res.errors()
            log.info("pose search: %d evaluations, %.2f s, error %.3f mm / %.3f deg",
                     res.iterations, res.seconds, et, er)
        return res

    def _descend(self, li, pose, evaluator):
        lv, sim = self.levels[li], self.sims[li]
        self._correct(li, pose)
        fr = _Frame(pose, self.pivot_mm)
        ev = evaluator(sim, fr, li)
        lr = self.lr * lv.lr
        if self.optimizer == "adam":
            xb, lb = _Adam(np.zeros(6), lr, lv.iters, self.patience, self.rel_tol).run(ev, lv.iters)
        else:
            xb, lb = _lbfgs(ev, np.zeros(6), lv.iters, lr, self.rel_tol)
        return fr.pose(xb), lb


def register(volume, target: np.ndarray, init_pose: Pose, probe="craniotomy", loss=DEFAULT_LOSS,
             n_starts: int | None = None, **kw) -> SearchResult:
    """One-call pose search (see :class:`PoseSearch`)."""
    run_kw = {k: kw.pop(k) for k in ("start_mm", "start_deg", "seed", "true_pose", "mask",
                                     "progress") if k in kw}
    ps = PoseSearch(volume, probe, loss=loss, **kw)
    return ps.run(target, init_pose, n_starts=n_starts, **run_kw)


def search_figure(search: PoseSearch, res: SearchResult, target: np.ndarray, path: str) -> str:
    """Loss curve and target / initial / final images with the target's edges overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .losses import blur_np

    init_img = search.render(res.init_pose) if res.init_pose is not None else np.zeros_like(target)
    final_img = search.render(res.pose)
    probe = search.probe
    x, z = probe.fan_axes_mm()
    px = probe.fan_pixel_mm()
    extent = (x[0] - px / 2, x[-1] + px / 2, z[-1] + px / 2, z[0] - px / 2)
    tb = blur_np(target, 2.0)
    gy, gx = np.gradient(tb)
    gm = np.hypot(gx, gy)
    inside = blur_np(probe.scan_grid()[2].astype(np.float64), 3.0) > 0.999   # not the fan border
    thr = np.percentile(gm[inside], 90) if inside.any() else gm.max()
    edges = np.where((gm > thr) & inside, 1.0, np.nan)
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.4), constrained_layout=True)
    ax = axes[0]
    lv = np.array(res.level_of_iteration)
    hist = np.array(res.loss_history)
    for li in np.unique(lv):
        idx = np.nonzero(lv == li)[0]
        ax.plot(idx, hist[idx], ".", ms=3, label=f"level {li} (scale {search.levels[li].scale:g})")
    ax.set_xlabel("evaluation")
    ax.set_ylabel(f"loss ({search.loss_kind})")
    ax.legend(fontsize=8)
    ax.set_title(f"{res.iterations} evaluations, {res.seconds:.1f} s")
    errs = res.errors()
    titles = ["target", "initial pose",
              "final pose" + (f" ({errs[0]:.2f} mm, {errs[1]:.2f}°)" if errs else "")]
    for ax, img, title in zip(axes[1:], (target, init_img, final_img), titles):
        ax.imshow(img, cmap="gray", vmin=0, vmax=1, extent=extent)
        if title != "target":
            ax.imshow(edges, cmap="autumn", vmin=0, vmax=1, alpha=0.8, extent=extent)
        ax.set_title(title + (" + target edges" if title != "target" else ""))
        ax.set_xlabel("lateral x (mm)")
        ax.set_ylabel("depth z (mm)")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- command line -------------------------------------------------------------------------------
INIT_OFFSET_MM, INIT_OFFSET_DEG = 5.0, 5.0


def default_init_pose(target_pose: Pose) -> Pose:
    """The CLI's default start for a synthetic target: the target pose moved 5 mm along the
    probe's lateral axis and rotated 5 deg about its elevation axis (in-plane, about the face)."""
    return target_pose.moved((INIT_OFFSET_MM, 0.0, 0.0), (0.0, INIT_OFFSET_DEG * DEG, 0.0))


def load_target_image(path: str) -> np.ndarray:
    """A fan image from .npy (2-D array), .npz (key 'fan') or an image file such as .png
    (grayscale; colour is converted by luminance; 8/16-bit scaled to [0, 1])."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"target image not found: {path!r}")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npy":
            img = np.load(path, allow_pickle=False)
        elif ext == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "fan" not in z.files:
                    raise ValueError(f"target image {path!r}: .npz has no array 'fan' "
                                     f"(it has: {', '.join(z.files) or 'nothing'})")
                img = z["fan"]
        else:
            import matplotlib.image as mpimg

            img = mpimg.imread(path)
    except ValueError:
        raise
    except Exception as e:   # unreadable / not an image / pickled npy ...
        raise ValueError(f"target image {path!r}: cannot read it "
                         f"({type(e).__name__}: {e})") from None
    img = np.asarray(img)
    if img.dtype == np.uint8:
        img = img / 255.0
    elif img.dtype == np.uint16:
        img = img / 65535.0
    if img.ndim == 3 and img.shape[2] in (3, 4) and ext not in (".npy", ".npz"):
        img = img[..., :3] @ np.array([0.299, 0.587, 0.114])
    if img.ndim != 2:
        raise ValueError(f"target image {path!r}: expected a 2-D grayscale fan image, got an "
                         f"array of shape {img.shape}")
    if not np.issubdtype(img.dtype, np.number) or np.iscomplexobj(img):
        raise ValueError(f"target image {path!r}: not a real-valued image (dtype {img.dtype})")
    img = img.astype(np.float64)
    if not np.all(np.isfinite(img)):
        raise ValueError(f"target image {path!r} contains NaN or Inf")
    if img.min() < -1e-6 or img.max() > 1 + 1e-6:
        raise ValueError(f"target image {path!r}: values must lie in [0, 1] (B-mode display "
                         f"scale), got [{img.min():.4g}, {img.max():.4g}]")
    return img


def add_search_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``search`` subcommand (pose search) to an argparse subparsers object."""
    from .cli import _add_common

    s = subparsers.add_parser(
        "search", help="find the probe pose of a B-mode image (gradient-based pose search)",
        description="Recover the probe pose at which a B-mode fan image was taken, by "
                    "coarse-to-fine gradient descent on the image similarity between the target "
                    "and renders of the volume. The target is either synthetic (--target-pose: "
                    "rendered with coherent speckle, seed --seed) or a file (--target-image) in "
                    "the fan geometry of the probe options. Poses are 'tx,ty,tz,rx,ry,rz' "
                    "(mm, rotation vector in degrees) or a file with a 4x4 matrix.")
    _add_common(s)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--target-pose", help="render a synthetic target at this pose (its true pose); "
                                         "write --target-pose=-4,8,... when it starts with '-'")
    g.add_argument("--target-image",
                   help="target fan image: .npy (2-D), .npz (array 'fan') or .png (grayscale, "
                        "scaled to [0, 1]); its shape must be the probe's fan image shape")
    g.add_argument("--case", help="ReMIND2Reg dataset folder, dataset JSON or case image: the "
                                  "target is the case's 3-D ultrasound resliced at --pose, the "
                                  "simulation uses the case MRI (--volume is ignored)")
    s.add_argument("--case-id", default=None, help="with --case: case id when there are several")
    s.add_argument("--mri", default=None, help="with --case: ceT1 (0001) or T2 (0002) [ceT1 if present]")
    s.add_argument("--pose", default=None,
                   help="with --case: pose at which the ultrasound volume is resliced (the tracked "
                        "pose) [default: middle of a synthetic case's sweep, else guessed from "
                        "the ultrasound coverage]; the search starts there unless --init-pose")
    s.add_argument("--init-pose",
                   help="starting pose; required with --target-image [default with --target-pose: "
                        f"the target pose moved {INIT_OFFSET_MM:g} mm along the probe's lateral "
                        f"axis and rotated {INIT_OFFSET_DEG:g} deg about its elevation axis]")
    s.add_argument("--true-pose", help="true pose of a --target-image, to report the errors")
    s.add_argument("--loss", default=DEFAULT_LOSS, choices=LOSS_NAMES,
                   help=f"image similarity [default: {DEFAULT_LOSS}]")
    s.add_argument("--optimizer", default="adam", choices=["adam", "lbfgs"],
                   help="optimizer [default: adam]")
    s.add_argument("--starts", type=int, default=None,
                   help="multi-start count at the coarsest level (the initial pose + random "
                        f"starts around it) [default: {DEFAULT_STARTS}]")
    s.add_argument("--json", default=None,
                   help="write the result (final pose, loss history, iterations, seconds; errors "
                        "in mm and degrees when the true pose is known) to this JSON file")
    s.add_argument("--figure", default=None,
                   help="write a PNG: loss curve; target, initial and final images with the "
                        "target's edges overlaid")
    s.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    s.set_defaults(func=cmd_search)
    return s


def cmd_search(a) -> int:
    """Run the ``search`` subcommand for parsed arguments ``a``."""
    from .cli import _probe_from_args

    if a.starts is not None and a.starts < 1:
        raise ValueError(f"--starts must be >= 1, got {a.starts}")
    if getattr(a, "case", None):
        from .remind_compare import cmd_search_case
        return cmd_search_case(a)
    probe = _probe_from_args(a)
    target_pose = Pose.parse(a.target_pose) if a.target_pose else None
    true_pose = target_pose if target_pose is not None else (
        Pose.parse(a.true_pose) if a.true_pose else None)
    if a.init_pose:
        init = Pose.parse(a.init_pose)
    elif target_pose is not None:
        init = default_init_pose(target_pose)
    else:
        raise ValueError("--init-pose is required with --target-image")
    target = None
    if a.target_image:      # check the file before building anything
        target = load_target_image(a.target_image)
        if target.shape != tuple(probe.image_px):
            raise ValueError(f"target image {a.target_image!r} has shape {target.shape}, but the "
                             f"probe's fan image is {tuple(probe.image_px)} (height, width): use "
                             "the probe options it was made with (e.g. --image-px)")
    t0 = time.perf_counter()
    ps = PoseSearch(a.volume, probe, loss=a.loss, optimizer=a.optimizer, mapping=a.mapping,
                    echo_model=a.echo_model, arch=a.arch, gain_db=a.gain_db,
                    dynamic_range_db=a.dynamic_range_db, tgc_db_per_cm=a.tgc_db_per_cm,
                    seed=a.seed)
    if target is None:
        rs = ps.render_sim
        rs.settings.speckle = not a.no_speckle
        target = ps.render(target_pose).astype(np.float64)
        rs.settings.speckle = True
    t_setup = time.perf_counter() - t0
    res = ps.run(target, init, n_starts=a.starts, true_pose=true_pose,
                 progress=False if a.no_progress else True)
    log.info("search: %d evaluations in %.2f s (setup %.2f s, JIT included)", res.iterations,
             res.seconds, t_setup)
    log.info("initial pose: %s", init.to_string())
    log.info("final pose:   %s (loss %.5f)", res.pose.to_string(), res.loss)
    if true_pose is not None:
        e0 = init.error_to(true_pose)
        et, er = res.errors()
        log.info("error to the true pose: %.3f mm, %.3f deg (initial %.2f mm, %.2f deg)",
                 et, er, *e0)
    if a.json:
        d = res.to_dict()
        d.update(volume=ps.volume.name, probe=repr(ps.probe), setup_seconds=t_setup,
                 target=a.target_image or f"synthetic at {target_pose.to_string()} (seed {a.seed})",
                 search=ps.describe())
        if true_pose is not None:
            e0 = init.error_to(true_pose)
            d["initial_translation_error_mm"], d["initial_rotation_error_deg"] = e0
        with open(a.json, "w") as fh:
            json.dump(d, fh, indent=2)
        log.info("wrote %s", a.json)
    if a.figure:
        search_figure(ps, res, target, a.figure)
        log.info("wrote %s", a.figure)
    print(res.pose.to_string())
    return 0
