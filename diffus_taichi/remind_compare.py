"""Simulation vs real ultrasound on a ReMIND2Reg case: the MRI resliced in the image plane, the
B-mode simulated from the MRI, the 3-D ultrasound resliced along the same fan, an overlay, and
the similarity (NCC of simulated vs real, LC2 of the real ultrasound against the MRI and against
the simulation); and the pose search of the simulation against the real reslice.

    cmp = compare_case(case, pose, probe)        # dict: images (H, W) and metrics
    compare_figure(cmp, "compare.png")
    res, info = search_case(case, target_pose, probe)   # PoseSearch against the real reslice

CLI: ``diffus-taichi compare --case DIR [--case-id ID] [--pose ...] --out fig.png`` and
``diffus-taichi search --case DIR [--pose ...] [--init-pose ...]``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time

import numpy as np

from .pose import Pose

log = logging.getLogger(__name__)


def image_ncc(a, b, mask=None) -> float:
    """Normalised cross-correlation of two images over ``mask`` (all pixels if None)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m = np.ones(a.shape, bool) if mask is None else np.asarray(mask, bool)
    if m.sum() < 2:
        return float("nan")
    x, y = a[m] - a[m].mean(), b[m] - b[m].mean()
    den = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else float("nan")


def lc2(us, img, mask=None, patch_px: int = 16, min_fill: float = 0.5) -> float:
    """Linear correlation of linear combination (Wein et al. 2008), NumPy: per square patch of
    ``patch_px``, least-squares fit ``us ~ c1 img + c2 |grad img| + c3`` over the masked pixels;
    LC2 = sum_p var_p R2_p / sum_p var_p (var_p: variance of ``us`` in the patch). In [0, 1], 1 =
    the ultrasound is exactly a local linear function of the image and its gradient magnitude.
    Patches less than ``min_fill`` inside the mask are skipped."""
    us, img = np.asarray(us, np.float64), np.asarray(img, np.float64)
    m = np.ones(us.shape, bool) if mask is None else np.asarray(mask, bool)
    gy, gx = np.gradient(img)
    g = np.hypot(gx, gy)
    num = den = 0.0
    H, W = us.shape
    for y in range(0, H, patch_px):
        for x in range(0, W, patch_px):
            mm = m[y:y + patch_px, x:x + patch_px]
            n = int(mm.sum())
            if n < max(4, min_fill * mm.size):
                continue
            b = us[y:y + patch_px, x:x + patch_px][mm]
            var = float(b.var())
            if var <= 1e-12:
                continue
            A = np.stack([img[y:y + patch_px, x:x + patch_px][mm],
                          g[y:y + patch_px, x:x + patch_px][mm], np.ones(n)], 1)
            c, *_ = np.linalg.lstsq(A, b, rcond=None)
            r2 = 1.0 - float(((A @ c - b) ** 2).mean()) / var
            num += var * max(r2, 0.0)
            den += var
    return num / den if den > 0 else float("nan")


def _case_volumes(case, mri_modality=None):
    mri = case.load_mri(mri_modality)
    us = case.load_us()
    return mri, us


def case_pose(case, mri, us, pose=None) -> Pose:
    """``pose`` (Pose or 'tx,ty,tz,rx,ry,rz' string/file) or, by default, the middle pose of a
    synthetic case's sweep, else a pose guessed from the ultrasound coverage."""
    from .remind import us_default_pose

    if pose is not None:
        return pose if isinstance(pose, Pose) else Pose.parse(pose)
    sp = case.sweep_poses()
    if sp:
        return sp[len(sp) // 2]
    return us_default_pose(us, mri)


def compare_case(case, pose=None, probe="craniotomy", mri_modality=None, sim=None,
                 reslicer=None, **sim_kwargs) -> dict:
    """Images (H, W) and metrics at ``pose``: ``mri``, ``simulated``, ``real`` (US reslice),
    ``mask`` (sector and ultrasound coverage), ``ncc`` (simulated vs real), ``lc2_real_mri``,
    ``lc2_real_sim``, ``coverage`` (fraction of the sector with ultrasound data)."""
    from .simulator import Simulator
    from .us_reslice import USReslicer

    if sim is None or reslicer is None:
        mri, us = _case_volumes(case, mri_modality)
    else:
        mri, us = sim.volume, reslicer.volume
    pose = case_pose(case, mri, us, pose)
    sim = sim or Simulator(mri, probe=probe, **sim_kwargs)
    rs = reslicer or USReslicer(us, sim.probe)
    fan = sim.render(pose)
    real = rs.reslice(pose)
    mask = rs.mask(pose)
    sector = sim.fan_mask()
    mri_img = sim.reslice(pose)
    out = {"case": case.case_id, "pose": pose, "mri_name": mri.name, "us_name": us.name,
           "probe": sim.probe, "mri": mri_img, "simulated": fan, "real": real, "mask": mask,
           "coverage": float(mask.sum() / max(1, sector.sum())),
           "ncc": image_ncc(fan, real, mask), "lc2_real_mri": lc2(real, mri_img, mask),
           "lc2_real_sim": lc2(real, fan, mask)}
    if out["coverage"] == 0:
        log.warning("case %s: the fan at pose %s has no ultrasound data (outside the acquired "
                    "region); metrics are NaN", case.case_id, pose.to_string())
    return out


def compare_figure(cmp: dict, path: str, dpi: int = 110) -> str:
    """Four panels (MRI reslice, simulated US, real US reslice, overlay: red = real, green =
    simulated, yellow where both are bright), mm axes, the metrics in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probe = cmp["probe"]
    x, z = probe.fan_axes_mm()
    px = probe.fan_pixel_mm()
    extent = (x[0] - px / 2, x[-1] + px / 2, z[-1] + px / 2, z[0] - px / 2)
    outline = probe.outline_mm()
    real = np.where(cmp["mask"], cmp["real"], 0.0)

    def unit(a):
        a = np.asarray(a, np.float64)
        hi = float(np.percentile(a[a > 0], 99.5)) if (a > 0).any() else 1.0
        return np.clip(a / max(hi, 1e-9), 0, 1)

    rgb = np.stack([unit(real), unit(cmp["simulated"]), np.zeros_like(real)], -1)
    fig, axes = plt.subplots(1, 4, figsize=(18, 5.0), constrained_layout=True)
    panels = [(cmp["mri"], f"MRI ({cmp['mri_name']}) resliced"), (cmp["simulated"], "simulated B-mode"),
              (real, f"real US ({cmp['us_name']}) resliced"), (rgb, "overlay: red real, green simulated")]
    for ax, (img, title) in zip(axes, panels):
        ax.imshow(img if img.ndim == 3 else unit(img), cmap="gray", extent=extent, vmin=0, vmax=1)
        ax.plot(outline[:, 0], outline[:, 1], color="#ffb000", lw=1.0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("lateral x (mm)")
        ax.set_ylabel("depth z (mm)")
        ax.set_facecolor("black")
    fig.suptitle(f"case {cmp['case']}, pose {cmp['pose'].to_string()} (mm, deg): "
                 f"NCC(sim, real) = {cmp['ncc']:.3f}, LC2(real | MRI) = {cmp['lc2_real_mri']:.3f}, "
                 f"LC2(real | sim) = {cmp['lc2_real_sim']:.3f}, US coverage {100 * cmp['coverage']:.0f} %",
                 fontsize=10)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    log.info("wrote %s", path)
    return path


def search_case(case, pose=None, probe="craniotomy", init_pose=None, mri_modality=None,
                search=None, reslicer=None, n_starts=None, seed=0, true_pose=None,
                progress=None, min_coverage: float = 0.3, **search_kwargs):
    """Pose search of the simulation (from the case MRI) against the real ultrasound resliced at
    ``pose`` (default: as :func:`case_pose`), masked to the ultrasound coverage; starts at
    ``init_pose`` (default ``pose``) with multi-start. Returns (SearchResult, info dict).
    ``search``: a :class:`PoseSearch` on the case MRI to reuse."""
    from .registration import PoseSearch
    from .us_reslice import USReslicer

    if search is None or reslicer is None:
        mri, us = _case_volumes(case, mri_modality)
    else:
        mri, us = search.volume, reslicer.volume
    pose = case_pose(case, mri, us, pose)
    ps = search or PoseSearch(mri, probe, **search_kwargs)
    rs = reslicer or USReslicer(us, ps.probe)
    target = rs.reslice(pose)
    mask = rs.mask(pose)
    cov = float(mask.sum() / max(1, ps.probe.scan_grid()[2].sum()))
    if cov < min_coverage:
        raise ValueError(f"case {case.case_id}: only {100 * cov:.0f} % of the fan at pose "
                         f"{pose.to_string()} has ultrasound data (need {100 * min_coverage:.0f} %); "
                         "choose a pose inside the acquired region")
    init = pose if init_pose is None else init_pose
    res = ps.run(target, init, n_starts=n_starts, seed=seed, true_pose=true_pose, mask=mask,
                 progress=progress)
    return res, {"target": target, "mask": mask, "coverage": cov, "pose": pose, "search": ps}


# --- command line ----------------------------------------------------------------------------
def _add_case_args(p: argparse.ArgumentParser, required=True) -> None:
    p.add_argument("--case", required=required,
                   help="ReMIND2Reg dataset folder (with imagesTr/), its dataset JSON, or one "
                        "ReMIND2Reg_<case>_<modality>.nii.gz image of the case")
    p.add_argument("--case-id", default=None,
                   help="case id (e.g. 0042) when the dataset has several cases")
    p.add_argument("--mri", default=None,
                   help="MRI modality to simulate from: ceT1 (0001) or T2 (0002) "
                        "[default: ceT1 if present, else T2]")


def add_compare_parser(sub) -> argparse.ArgumentParser:
    from .cli import _add_common

    c = sub.add_parser(
        "compare", help="simulated vs real ultrasound on a ReMIND2Reg case (figure, NCC, LC2)",
        description="Figure with the case MRI resliced in the image plane, the B-mode simulated "
                    "from it, the case's 3-D ultrasound resliced along the same fan and an overlay, "
                    "with NCC(simulated, real) and LC2(real | MRI), LC2(real | simulated). The "
                    "volume is the case MRI (--volume is ignored).")
    _add_common(c)
    _add_case_args(c)
    c.add_argument("--pose", default=None,
                   help="probe pose 'tx,ty,tz,rx,ry,rz' (mm, rotation vector in degrees) or a 4x4 "
                        "matrix file [default: middle of a synthetic case's sweep, else guessed from "
                        "the ultrasound coverage]; write --pose=-4,... when it starts with '-'")
    c.add_argument("--out", default="compare.png", help="output PNG [compare.png]")
    c.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    c.set_defaults(func=cmd_compare)
    return c


def _sim_kwargs(a) -> dict:
    return dict(mapping=a.mapping, echo_model=a.echo_model, arch=a.arch, gain_db=a.gain_db,
                dynamic_range_db=a.dynamic_range_db, tgc_db_per_cm=a.tgc_db_per_cm,
                speckle=not a.no_speckle, seed=a.seed)


def cmd_compare(a) -> int:
    from .cli import _probe_from_args
    from .remind import open_case

    case = open_case(a.case, a.case_id)
    t0 = time.perf_counter()
    cmp = compare_case(case, a.pose, _probe_from_args(a), a.mri, **_sim_kwargs(a))
    compare_figure(cmp, a.out)
    metrics = {k: cmp[k] for k in ("case", "ncc", "lc2_real_mri", "lc2_real_sim", "coverage")}
    metrics.update(pose=cmp["pose"].to_string(), mri=cmp["mri_name"], us=cmp["us_name"],
                   figure=a.out, seconds=time.perf_counter() - t0)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(metrics, fh, indent=2)
        log.info("wrote %s", a.json)
    log.info("case %s: NCC(sim, real) %.4f, LC2(real|MRI) %.4f, LC2(real|sim) %.4f, coverage %.0f %%",
             case.case_id, cmp["ncc"], cmp["lc2_real_mri"], cmp["lc2_real_sim"], 100 * cmp["coverage"])
    print(a.out)
    return 0


def cmd_search_case(a) -> int:
    """``diffus-taichi search --case ...``: pose search against the case's real reslice."""
    from .cli import _probe_from_args
    from .registration import search_figure
    from .remind import open_case

    case = open_case(a.case, a.case_id)
    pose = Pose.parse(a.pose) if getattr(a, "pose", None) else None
    init = Pose.parse(a.init_pose) if a.init_pose else None
    true_pose = Pose.parse(a.true_pose) if a.true_pose else None
    kw = _sim_kwargs(a)
    kw.pop("speckle")
    res, info = search_case(case, pose, _probe_from_args(a), init_pose=init, mri_modality=a.mri,
                            n_starts=a.starts, true_pose=true_pose,
                            progress=False if a.no_progress else True, loss=a.loss,
                            optimizer=a.optimizer, **kw)
    ps = info["search"]
    p0 = info["pose"]
    off_t, off_r = res.pose.error_to(p0)
    log.info("case %s: target = real US resliced at %s (%.0f %% covered)", case.case_id,
             p0.to_string(), 100 * info["coverage"])
    log.info("final pose: %s (loss %.5f), %.3f mm / %.3f deg from the reslice pose, %d "
             "evaluations, %.1f s", res.pose.to_string(), res.loss, off_t, off_r, res.iterations,
             res.seconds)
    if a.json:
        d = res.to_dict()
        d.update(case=case.case_id, reslice_pose=p0.to_string(), coverage=info["coverage"],
                 offset_from_reslice_pose_mm=off_t, offset_from_reslice_pose_deg=off_r,
                 volume=ps.volume.name, probe=repr(ps.probe), search=ps.describe())
        with open(a.json, "w") as fh:
            json.dump(d, fh, indent=2)
        log.info("wrote %s", a.json)
    if a.figure:
        search_figure(ps, res, info["target"], a.figure)
        log.info("wrote %s", a.figure)
    print(res.pose.to_string())
    return 0
