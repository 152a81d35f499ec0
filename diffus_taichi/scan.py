"""Scan conversion: B-mode lines (n_lines, n_samples) -> Cartesian fan image (height, width)
in probe-plane millimetres (row 0 = shallowest, column 0 = most negative lateral x), bilinear,
zero outside the sector. The per-pixel (line, sample) coordinates depend only on the probe and
are computed once (:meth:`Probe.scan_grid`).
"""

import numpy as np
import taichi as ti


def scan_lookup(probe) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 2) int32 base (line, sample) with -1 outside the fan, and (H, W, 2) fractions."""
    li, si, inside = probe.scan_grid()
    l0 = np.clip(np.floor(li), 0, probe.n_lines - 2)
    s0 = np.clip(np.floor(si), 0, probe.n_samples - 2)
    base = np.stack([l0, s0], -1).astype(np.int32)
    frac = np.stack([li - l0, si - s0], -1)
    base[~inside] = -1
    frac[~inside] = 0.0
    return base, frac


@ti.func
def _bilinear(bmode: ti.template(), b, f, l0):
    v = 0.0
    if b[0] >= 0:
        l, s = l0 + b[0], b[1]
        v0 = bmode[l, s] + f[1] * (bmode[l, s + 1] - bmode[l, s])
        v1 = bmode[l + 1, s] + f[1] * (bmode[l + 1, s + 1] - bmode[l + 1, s])
        v = v0 + f[0] * (v1 - v0)
    return v


@ti.kernel
def scan_convert(bmode: ti.template(), base: ti.template(), frac: ti.template(),
                 fan: ti.template()):
    """bmode (B n_lines, n_samples) -> fan (H, W) (B = 1) or (B, H, W)."""
    if ti.static(len(fan.shape) == 2):
        for y, x in fan:
            fan[y, x] = _bilinear(bmode, base[y, x], frac[y, x], 0)
    else:
        for b, y, x in fan:
            fan[b, y, x] = _bilinear(bmode, base[y, x], frac[y, x], b * (bmode.shape[0] // fan.shape[0]))


@ti.kernel
def copy_frame(fans: ti.template(), b: ti.i32, fan: ti.template()):
    """fan (H, W) = fans[b] of a batch (B, H, W)."""
    for y, x in fan:
        fan[y, x] = fans[b, y, x]


@ti.kernel
def copy_field(src: ti.template(), dst: ti.template()):
    for I in ti.grouped(dst):
        dst[I] = src[I]
