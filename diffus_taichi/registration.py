"""Gradient-based probe pose search: recover where an ultrasound image was taken.

Coarse-to-fine over probe resolutions (fewer lines/samples and blurred images first), Adam or
L-BFGS on x = [tx, ty, tz (mm), wx, wy, wz (degrees, rotation vector)], multi-start at the
coarsest level, stopping on stalled improvement, with a progress bar.

    res = register("brain", target_image, init_pose, probe="craniotomy", loss="ncc")
    res.pose, res.to_dict()
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from .pose import Pose
from .probe import Probe, get_probe
from .progress import Progress

log = logging.getLogger(__name__)

DEG = math.pi / 180.0


@dataclass(frozen=True)
class Level:
    """One resolution level: probe lines/samples/pixels scaled by ``scale``; Gaussian blur of
    render and target (fan pixels of this level); at most ``iters`` iterations; ``speckle`` of
    the render: 'mean' (expected intensity, smooth in the pose) or 'coherent'."""

    scale: float = 1.0
    blur_px: float = 0.0
    iters: int = 30
    speckle: str = "mean"


DEFAULT_LEVELS = (Level(0.25, 2.0, 60), Level(0.5, 2.0, 40), Level(1.0, 2.0, 30),
                  Level(1.0, 0.5, 20, "coherent"))


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

    def errors(self) -> tuple[float, float] | None:
        """(translation error mm, rotation error deg) to the true pose, if known."""
        return None if self.true_pose is None else self.pose.error_to(self.true_pose)

    def to_dict(self) -> dict:
        d = {"pose": self.pose.to_string(), "pose_vector_mm_rad": self.pose.as_vector().tolist(),
             "pose_matrix": self.pose.matrix.tolist(), "loss": self.loss,
             "loss_history": [float(v) for v in self.loss_history],
             "level_of_iteration": self.level_of_iteration, "iterations": self.iterations,
             "seconds": self.seconds, "start_losses": self.start_losses}
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


def _x_of(pose: Pose) -> np.ndarray:
    v = pose.as_vector()
    return np.r_[v[:3], v[3:] / DEG]


def _pose_of(x: np.ndarray) -> Pose:
    return Pose.from_vector(np.r_[x[:3], x[3:] * DEG])


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


class PoseSearch:
    """Pose search for one volume, probe and echo model; reusable for many targets.

    Args:
        volume, probe, mapping, echo_model, arch, **sim_kwargs: as for :class:`Simulator`.
        loss: mse | ncc | lncc | lc2. levels: coarse-to-fine :class:`Level` list.
        optimizer: ``adam`` or ``lbfgs``. lr_mm / lr_deg: Adam step sizes at the first level
        (halved at each finer level).
    """

    def __init__(self, volume="brain", probe="craniotomy", loss="ncc", levels=DEFAULT_LEVELS,
                 optimizer="adam", lr_mm=1.0, lr_deg=1.0, mapping="auto", echo_model="primary",
                 arch=None, patience=8, rel_tol=1e-3, **sim_kwargs):
        from .simulator import Simulator

        if optimizer not in ("adam", "lbfgs"):
            raise ValueError(f"optimizer must be 'adam' or 'lbfgs', got {optimizer!r}")
        self.probe = probe if isinstance(probe, Probe) else get_probe(probe)
        self.loss_kind, self.levels, self.optimizer = loss, tuple(levels), optimizer
        self.lr = np.array([lr_mm] * 3 + [lr_deg] * 3, dtype=np.float64)
        self.patience, self.rel_tol = patience, rel_tol
        self.sims = []
        first = None
        sim_kwargs.pop("speckle", None)
        for lv in self.levels:
            p = self.level_probe(lv)
            sim = Simulator(volume if first is None else None, probe=p, mapping=mapping,
                            echo_model=echo_model, arch=arch, requires_grad="pose",
                            share_volume_with=first, speckle=lv.speckle, **sim_kwargs)
            first = first or sim
            self.sims.append(sim)
        self.volume = first.volume

    def level_probe(self, lv: Level) -> Probe:
        p = self.probe
        if lv.scale == 1.0:
            return p
        H, W = p.image_px
        return p.with_(n_lines=max(8, int(round(p.n_lines * lv.scale))),
                       n_samples=max(16, int(round(p.n_samples * lv.scale))),
                       image_px=(max(16, int(round(H * lv.scale))), max(16, int(round(W * lv.scale)))))

    def render(self, pose: Pose) -> np.ndarray:
        """Full-resolution render with coherent speckle (the probe given to the constructor)."""
        sim = self.sims[-1]
        old = sim.settings.speckle
        sim.settings.speckle = True
        try:
            return sim.render(pose)
        finally:
            sim.settings.speckle = old

    # --- optimisers ---------------------------------------------------------------------------
    def _eval(self, sim, x):
        loss, g = sim.value_and_grad(_pose_of(x))
        gx = np.r_[g["pose"][:3], g["pose"][3:] * DEG]
        return loss, gx

    def _adam(self, sim, x, iters, lr, hist, bar, level_idx):
        m, v = np.zeros(6), np.zeros(6)
        best_x, best_l, since = x.copy(), math.inf, 0
        for it in range(iters):
            loss, g = self._eval(sim, x)
            hist.append((loss, level_idx))
            bar.update(1, loss=loss)
            if loss < best_l - self.rel_tol * abs(best_l):
                since = 0
            else:
                since += 1
            if loss < best_l:
                best_x, best_l = x.copy(), loss
            if since >= self.patience:
                break
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            mh, vh = m / (1 - 0.9 ** (it + 1)), v / (1 - 0.999 ** (it + 1))
            decay = 0.5 * (1 + math.cos(math.pi * it / max(1, iters)))
            x = x - lr * (0.1 + 0.9 * decay) * mh / (np.sqrt(vh) + 1e-12)
        return best_x, best_l

    def _lbfgs(self, sim, x, iters, lr, hist, bar, level_idx, mem=6):
        S, Y = [], []
        loss, g = self._eval(sim, x)
        hist.append((loss, level_idx))
        scale = lr            # unit-free preconditioner: mm and degrees steps of ~lr
        for it in range(iters):
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
            if not S:
                d = -g * scale / (np.abs(g * scale).max() + 1e-12) * lr
            if g @ d >= 0:
                d = -g * scale / (np.abs(g * scale).max() + 1e-12) * lr
                S, Y = [], []
            step, done = 1.0, False
            for _ in range(6):
                xn = x + step * d
                ln, gn = self._eval(sim, xn)
                hist.append((ln, level_idx))
                bar.update(1, loss=ln)
                if ln <= loss + 1e-4 * step * (g @ d):
                    done = True
                    break
                step *= 0.4
            if not done:
                break
            s, y = xn - x, gn - g
            if s @ y > 1e-12:
                S.append(s)
                Y.append(y)
                S, Y = S[-mem:], Y[-mem:]
            rel = (loss - ln) / max(abs(loss), 1e-12)
            x, loss, g = xn, ln, gn
            if rel < self.rel_tol * 0.1:
                break
        return x, loss

    # --- search ------------------------------------------------------------------------------
    def run(self, target: np.ndarray, init_pose: Pose, n_starts: int = 1, start_mm: float = 5.0,
            start_deg: float = 5.0, seed: int = 0, true_pose: Pose | None = None,
            mask="fan", progress: bool | None = None) -> SearchResult:
        """Search from ``init_pose`` (plus ``n_starts - 1`` random starts within ±start_mm,
        ±start_deg per axis) for the pose whose render best matches ``target`` (fan image of the
        full-resolution probe)."""
        target = np.asarray(target, dtype=np.float64)
        if target.shape != tuple(self.probe.image_px):
            raise ValueError(f"target image shape {target.shape} != probe fan {self.probe.image_px}")
        t0 = time.perf_counter()
        rng = np.random.default_rng(seed)
        x0 = _x_of(init_pose)
        starts = [x0] + [x0 + rng.uniform(-1, 1, 6) * np.r_[[start_mm] * 3, [start_deg] * 3]
                         for _ in range(max(0, n_starts - 1))]
        hist = []
        total = sum(lv.iters for lv in self.levels) + (len(starts) - 1) * self.levels[0].iters
        if self.optimizer == "lbfgs":
            total *= 2
        step = self._lbfgs if self.optimizer == "lbfgs" else self._adam
        start_losses = []
        with Progress(total, "pose search", enabled=progress) as bar:
            best = None
            for li, (lv, sim) in enumerate(zip(self.levels, self.sims)):
                tgt = target if sim.probe is self.probe else resample_fan(target, self.probe, sim.probe)
                sim.set_loss(tgt, self.loss_kind, mask=mask, blur_px=lv.blur_px)
                lr = self.lr * 0.5 ** li
                if li == 0:
                    cands = []
                    for xs in starts:
                        xb, lb = step(sim, xs.copy(), lv.iters, lr, hist, bar, li)
                        cands.append((lb, xb))
                        start_losses.append(float(lb))
                    best = min(cands, key=lambda c: c[0])[1]
                else:
                    best, _ = step(sim, best, lv.iters, lr, hist, bar, li)
            final_loss = self.sims[-1].loss(_pose_of(best))
        res = SearchResult(pose=_pose_of(best), loss=float(final_loss),
                           loss_history=[h[0] for h in hist], level_of_iteration=[h[1] for h in hist],
                           iterations=len(hist), seconds=time.perf_counter() - t0,
                           start_losses=start_losses, true_pose=true_pose, init_pose=init_pose)
        if true_pose is not None:
            et, er = res.errors()
            log.info("pose search: %d iterations, %.2f s, error %.3f mm / %.3f deg",
                     res.iterations, res.seconds, et, er)
        return res


def register(volume, target: np.ndarray, init_pose: Pose, probe="craniotomy", loss="ncc",
             n_starts: int = 1, **kw) -> SearchResult:
    """One-call pose search (see :class:`PoseSearch`)."""
    run_kw = {k: kw.pop(k) for k in ("start_mm", "start_deg", "seed", "true_pose", "mask", "progress")
              if k in kw}
    return PoseSearch(volume, probe, loss=loss, **kw).run(target, init_pose, n_starts=n_starts, **run_kw)


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
    inside = probe.scan_grid()[2]
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
    titles = ["target", "initial pose", "final pose" + (f" ({errs[0]:.2f} mm, {errs[1]:.2f}°)" if errs else "")]
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
