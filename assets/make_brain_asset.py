#!/usr/bin/env python
"""Build the compact built-in brain volume ``assets/brain_mni152_2009a.npz``.

Source
------
The MNI ICBM152 2009a nonlinear *symmetric* template (T1, grey-matter and
white-matter probability maps; 197x233x189 voxels, 1 mm, uint8) that nilearn
ships inside its package data folder (``nilearn/datasets/data/
mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``).  No download is
needed; nilearn is only used to locate the files.  Licence and references:
``assets/LICENSE_MNI152.txt``.

Nilearn's copy of the T1 is *brain-extracted*: it is zero outside a brain
mask, so it contains no skull and no scalp.  The two head layers are therefore
added as synthetic, geometric shells (see below), not read from the image.

Output keys (all arrays indexed [x, y, z], 1 mm isotropic, RAS)
--------------------------------------------------------------
``affine``        float64 (4, 4): voxel index -> world (RAS) mm, including the
                  crop offset.
``t1``            uint8 (X, Y, Z): T1 intensity (0 outside the brain mask).
``grey_matter``, ``white_matter``, ``csf``, ``cortical_bone``, ``scalp``
                  uint8 (X, Y, Z): tissue volume fraction, 0..255 <=> 0..1.  The
                  sum over channels is <= 255 everywhere; the remainder is
                  coupling water / background.
``channel_names`` str array: the tissue channel keys above, in this order.
                  Each name is a row of ``assets/tissues.csv``.

How the tissue channels are derived
-----------------------------------
* brain      = (T1 > 0) or (GM + WM >= 50 %).
* intracranial region (IC) = brain, morphologically closed with a ball of
  radius ``CLOSE_MM`` (bridges the interhemispheric fissure, tentorial notch
  and open sulci) and hole-filled.
* ``grey_matter`` / ``white_matter``: the template probabilities inside IC,
  0 outside.
* ``csf``: inside IC, ``255 - GM - WM`` (ventricles, cisterns, sulci); outside
  IC, a synthetic subarachnoid/dural layer ``CSF_MM`` thick.
* ``cortical_bone``: synthetic shell of thickness ``BONE_MM`` outside the CSF
  layer, thinned smoothly to ``TEMPORAL_BONE_MM`` over the temporal squama
  (the transcranial "temporal window"); the whole skull (tables + diploe) is
  labelled cortical bone.
* ``scalp``: synthetic shell of thickness ``SCALP_MM`` outside the bone.
  The shells are defined on the Euclidean distance ``d`` from IC with a
  1-voxel linear partial-volume ramp at each interface; deep pockets beyond
  the bone (scalp) outer surface that a ball of radius ``POCKET_MM`` cannot
  enter are filled with bone (scalp), so no scalp appears inside the head
  (see ``head_layers``).  Below the cerebellum the shells simply wrap the
  brainstem down to the bottom of the volume (there is no skull base, face or
  neck anatomy).

``t1``, GM and WM are rounded down to multiples of 2 (``--step``; the lost
<= 1/255 of GM/WM goes to CSF) to keep the file under 6 MB; ``--step 1``
keeps the template values exactly (file ~6.8 MB).

Everything uses numpy only (distances via an exact, separable, capped
squared-distance transform built from array shifts).

Usage: ``python assets/make_brain_asset.py [--out PATH] [--margin 8] [--step 2]``
(requires ``pip install nilearn``; only maintainers need to run it).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np

log = logging.getLogger("make_brain_asset")

CHANNELS = ("grey_matter", "white_matter", "csf", "cortical_bone", "scalp")
CLOSE_MM = 6.0          # closing radius defining the intracranial region
CSF_MM = 2.0            # extra-cerebral CSF / dura layer outside the brain mask
BONE_MM = 6.5           # typical adult calvarial thickness
TEMPORAL_BONE_MM = 3.0  # thinnest point of the temporal squama
SCALP_MM = 5.0          # skin + subcutaneous tissue + galea
POCKET_MM = 8.0         # closing radius that fills deep pockets of the bone / scalp layers
# temporal squama centre (world mm, |x| lateral) and Gaussian width
TEMPORAL_YZ = (-20.0, 0.0)
TEMPORAL_SIGMA_MM = 22.0
DEFAULT_OUT = Path(__file__).resolve().parent / "brain_mni152_2009a.npz"


def nilearn_data_dir() -> Path:
    """Folder of nilearn's bundled data files (no download)."""
    import nilearn

    return Path(os.path.dirname(nilearn.__file__)) / "datasets" / "data"


def load(kind: str) -> tuple[np.ndarray, np.ndarray]:
    path = nilearn_data_dir() / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
    img = nib.load(str(path))
    log.info("read %s %s", path.name, img.shape)
    return np.asanyarray(img.dataobj).astype(np.uint8), img.affine.astype(np.float64)


def _shift(a: np.ndarray, off: int, axis: int, fill) -> np.ndarray:
    """out[i] = a[i + off] along ``axis``; out-of-range entries are ``fill``."""
    out = np.full_like(a, fill)
    n = a.shape[axis]
    src = [slice(None)] * a.ndim
    dst = [slice(None)] * a.ndim
    if off >= 0:
        src[axis], dst[axis] = slice(off, n), slice(0, n - off)
    else:
        src[axis], dst[axis] = slice(0, n + off), slice(-off, n)
    out[tuple(dst)] = a[tuple(src)]
    return out


def distance_to(mask: np.ndarray, cap: int) -> np.ndarray:
    """Euclidean distance (voxels) from every voxel to the nearest ``mask`` voxel.

    Exact for distances <= ``cap`` (separable min-plus with o**2 along each
    axis); larger values are only lower-bounded by ``cap``.  Nothing outside
    the array counts as part of ``mask``.
    """
    big = np.float32(3 * (cap + 1) ** 2)
    sq = np.where(mask, np.float32(0), big).astype(np.float32)
    for axis in range(3):
        best = sq.copy()
        for off in range(1, cap + 1):
            for o in (off, -off):
                np.minimum(best, _shift(sq, o, axis, big) + np.float32(off * off), out=best)
        sq = best
    return np.sqrt(sq)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed cavities: flood the outside from the array border (6-conn.)."""
    outside = np.zeros_like(mask)
    for axis in range(3):
        idx = [slice(None)] * 3
        for end in (0, -1):
            idx[axis] = end
            outside[tuple(idx)] = ~mask[tuple(idx)]
    free = ~mask
    while True:
        grown = outside.copy()
        for axis in range(3):
            for o in (1, -1):
                grown |= _shift(outside, o, axis, False)
        grown &= free
        if np.array_equal(grown, outside):
            break
        outside = grown
    return ~outside


def closing(mask: np.ndarray, radius: float, cap: int) -> np.ndarray:
    """Morphological closing with a ball: dilate, then erode (array edges never erode)."""
    dilated = distance_to(mask, cap) <= radius
    return (distance_to(~dilated, cap) > radius) | mask


def ramp(x: np.ndarray) -> np.ndarray:
    """Partial-volume fraction of a voxel whose centre is ``x`` voxels past an interface."""
    return np.clip(x + 0.5, 0.0, 1.0)


def quantise(a: np.ndarray, step: int) -> np.ndarray:
    """Round uint8 values *down* to multiples of ``step`` (so GM + WM never grows)."""
    if step <= 1:
        return a
    return (a // step * step).astype(np.uint8)


def head_layers(ic: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic extra-cerebral CSF, skull and scalp fractions (0..1) around ``ic``.

    Layers are bands of the Euclidean distance ``d`` (mm) from the intracranial
    region: CSF for d < r1, bone up to r2 (temporal thinning), scalp up to r3.
    Deep pockets between lobes (e.g. in front of the brainstem) would otherwise
    get "scalp" inside the head, so each outer surface is taken from the
    *closing* of its band with a ball of radius ``POCKET_MM``, written as the
    continuous field g = POCKET_MM - dist(x, {d > r + POCKET_MM}) (<= 0 inside;
    equals d - r on convex parts).  The computation runs on a padded grid
    whose lowest slab repeats the bottom slice (the brainstem continues as a
    cylinder) so the array's lower edge leaves no artefacts.
    """
    cap = int(np.ceil(CSF_MM + BONE_MM + SCALP_MM + POCKET_MM)) + 2
    pad = cap
    icp = np.pad(ic, pad, mode="constant")
    icp[pad:-pad, pad:-pad, :pad] = ic[:, :, :1]   # extend the bottom slice downward
    d = distance_to(icp, cap)

    ijk = np.indices(d.shape, dtype=np.float32) - np.float32(pad)
    world = np.tensordot(affine[:3, :3].astype(np.float32), ijk, axes=1)
    world += affine[:3, 3, None, None, None].astype(np.float32)
    lateral = 1.0 / (1.0 + np.exp(-(np.abs(world[0]) - 45.0) / 4.0))
    bump = np.exp(-((world[1] - TEMPORAL_YZ[0]) ** 2 + (world[2] - TEMPORAL_YZ[1]) ** 2)
                  / (2 * TEMPORAL_SIGMA_MM**2))
    del world, ijk
    r1 = CSF_MM
    r2 = r1 + BONE_MM - (BONE_MM - TEMPORAL_BONE_MM) * lateral * bump
    r3 = r2 + SCALP_MM
    g2 = POCKET_MM - distance_to(d > r2 + POCKET_MM, cap)
    g3 = POCKET_MM - distance_to(d > r3 + POCKET_MM, cap)
    inner = (slice(pad, -pad),) * 3
    d, g2, g3 = d[inner], g2[inner], g3[inner]
    out = ~ic
    csf_o = np.where(out, 1.0 - ramp(d - r1), 0.0)
    bone = np.where(out, ramp(d - r1) - ramp(np.minimum(g2, d - r1)), 0.0)
    scalp = np.where(out, ramp(g2) - ramp(np.minimum(g3, g2)), 0.0)
    return csf_o, bone, scalp


def build(margin: int = 8, step: int = 2) -> dict[str, np.ndarray]:
    t1, affine = load("t1")
    gm, aff_gm = load("gm")
    wm, aff_wm = load("wm")
    assert np.allclose(affine, aff_gm) and np.allclose(affine, aff_wm)
    assert np.allclose(np.abs(np.diag(affine)[:3]), 1.0), "expected 1 mm RAS grid"

    brain = (t1 > 0) | (gm.astype(np.int16) + wm >= 128)
    # the template maps are averages of 152 brains: 8-bit precision is more than
    # they carry; a coarser step makes the npz markedly smaller (~6.8 -> ~5.8 MB)
    t1, gm, wm = (quantise(a, step) for a in (t1, gm, wm))
    t1[brain & (t1 == 0)] = step          # keep "t1 > 0" == brain mask

    # intracranial region: closing (dilate then erode) + hole filling
    ic = fill_holes(closing(brain, CLOSE_MM, int(CLOSE_MM) + 2))
    log.info("brain %d vox, intracranial %d vox (%.0f ml)", brain.sum(), ic.sum(), ic.sum() / 1e3)
    csf_o, bone, scalp = head_layers(ic, affine)

    gm_c = np.where(ic, gm, 0).astype(np.int16)
    wm_c = np.where(ic, wm, 0).astype(np.int16)
    csf_c = np.where(ic, 255 - gm_c - wm_c, np.rint(255 * csf_o)).astype(np.int16)
    bone_c = np.rint(255 * bone).astype(np.int16)
    scalp_c = np.rint(255 * scalp).astype(np.int16)
    chans = [gm_c, wm_c, csf_c, bone_c, scalp_c]
    excess = sum(chans) - 255          # rounding can overshoot by 1; trim from the outermost
    for c in reversed(chans):
        take = np.clip(np.minimum(excess, c), 0, None)
        c -= take
        excess -= take
    assert (sum(chans) <= 255).all() and all((c >= 0).all() for c in chans)
    lost = gm[~ic].astype(np.int64).sum() + wm[~ic].astype(np.int64).sum()
    log.info("GM+WM probability mass dropped outside IC: %.2f%%",
             100 * lost / (gm.astype(np.int64).sum() + wm.astype(np.int64).sum()))

    # crop to the head (any tissue) + margin, keep 1 mm spacing
    head = sum(chans) > 0
    lo = np.maximum(np.argwhere(head).min(0) - margin, 0)
    hi = np.minimum(np.argwhere(head).max(0) + margin + 1, head.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    new_aff = affine.copy()
    new_aff[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    log.info("crop %s -> %s, index offset %s", head.shape, tuple(int(v) for v in hi - lo), lo.tolist())

    arrays = {"affine": new_aff, "t1": np.ascontiguousarray(t1[crop])}
    for name, c in zip(CHANNELS, chans):
        arrays[name] = np.ascontiguousarray(c[crop].astype(np.uint8))
    arrays["channel_names"] = np.array(CHANNELS)
    return arrays


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--margin", type=int, default=8, help="background voxels kept around the head")
    ap.add_argument("--step", type=int, default=2,
                    help="quantisation step of t1/GM/WM (1 = lossless copy of the template, ~6.8 MB)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    arrays = build(args.margin, args.step)
    np.savez_compressed(args.out, **arrays)
    log.info("wrote %s (%.2f MB): %s", args.out, args.out.stat().st_size / 1e6,
             ", ".join(f"{k}{tuple(v.shape)}:{v.dtype}" for k, v in arrays.items()))


if __name__ == "__main__":
    main()
