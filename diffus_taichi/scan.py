"""Scan conversion: B-mode lines (n_lines, n_samples) -> Cartesian fan image (height, width)
in probe-plane millimetres (row 0 = shallowest, column 0 = most negative lateral x), bilinear,
zero outside the sector. The per-pixel (line, sample) coordinates depend only on the probe and
are computed once (:meth:`Probe.scan_grid`).
"""

import numpy as np
import taichi as ti

from .launch import fast_call


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


@ti.func
def scan_fan(bmode: ti.template(), base: ti.template(), frac: ti.template(), fan: ti.template(),
             out: ti.template(), with_out: ti.template()):
    """The loop of :func:`scan_convert` (a parallel loop where it is inlined at kernel level);
    with_out (static): also write each pixel to ``out`` (an ndarray of fan's shape)."""
    if ti.static(len(fan.shape) == 2):
        for y, x in fan:
            v = _bilinear(bmode, base[y, x], frac[y, x], 0)
            fan[y, x] = v
            if ti.static(with_out):
                out[y, x] = v
    else:
        for b, y, x in fan:
            v = _bilinear(bmode, base[y, x], frac[y, x], b * (bmode.shape[0] // fan.shape[0]))
            fan[b, y, x] = v
            if ti.static(with_out):
                out[b, y, x] = v


@ti.kernel
def scan_convert(bmode: ti.template(), base: ti.template(), frac: ti.template(),
                 fan: ti.template()):
    """bmode (B n_lines, n_samples) -> fan (H, W) (B = 1) or (B, H, W)."""
    scan_fan(bmode, base, frac, fan, fan, False)


def adjoint_lookup(base: np.ndarray, frac: np.ndarray, n_lines: int, n_samples: int):
    """Transpose of :func:`scan_convert` (B = 1) as CSR: the pixels p = y W + x that read
    B-mode element i = l n_samples + s are pix[off[i]:off[i + 1]], with bilinear weights w
    (frac as held in the field). Returns off (n_lines n_samples + 1,), pix, w (nnz,)."""
    H, W = base.shape[:2]
    y, x = np.nonzero(base[..., 0] >= 0)
    l0, s0 = base[y, x, 0].astype(np.int64), base[y, x, 1].astype(np.int64)
    f0, f1 = frac[y, x, 0].astype(np.float64), frac[y, x, 1].astype(np.float64)
    i = l0 * n_samples + s0
    idx = np.concatenate([i, i + 1, i + n_samples, i + n_samples + 1])
    w = np.concatenate([(1 - f0) * (1 - f1), (1 - f0) * f1, f0 * (1 - f1), f0 * f1])
    order = np.argsort(idx, kind="stable")
    off = np.zeros(n_lines * n_samples + 1, np.int64)
    np.cumsum(np.bincount(idx, minlength=n_lines * n_samples), out=off[1:])
    return off, np.tile(y * W + x, 4)[order], w[order]


class ScanAdjoint:
    """Fields of :func:`adjoint_lookup` for :func:`scan_convert_ad` (real: Taichi float type)."""

    def __init__(self, base, frac, n_lines, n_samples, real):
        off, pix, w = adjoint_lookup(base, frac, n_lines, n_samples)
        n = max(len(pix), 1)
        self.off = ti.field(ti.i32, shape=len(off))
        self.pix = ti.field(ti.i32, shape=n)
        self.w = ti.field(real, shape=n)
        self.off.from_numpy(off.astype(np.int32))
        self.pix.from_numpy(np.resize(pix, n).astype(np.int32))
        self.w.from_numpy(np.resize(w, n).astype(np.float64 if real == ti.f64 else np.float32))


@ti.kernel
def _scan_convert_bwd(bmode: ti.template(), fan: ti.template(), off: ti.template(),
                      pix: ti.template(), w: ti.template()):
    """bmode.grad += transpose(scan_convert) fan.grad, a gather per B-mode element."""
    for l, s in bmode:
        i = l * bmode.shape[1] + s
        acc = 0.0
        for k in range(off[i], off[i + 1]):
            p = pix[k]
            acc += w[k] * fan.grad[p // fan.shape[1], p % fan.shape[1]]
        bmode.grad[l, s] = bmode.grad[l, s] + acc


@ti.ad.grad_replaced
def scan_convert_ad(bmode, base, frac, fan, adj):
    """:func:`scan_convert` (B = 1) with a hand-written adjoint (gather with the
    :class:`ScanAdjoint` adj; the automatic one scatters with atomics, ~3x slower on CPU)."""
    fast_call(scan_convert, bmode, base, frac, fan)


@ti.ad.grad_for(scan_convert_ad)
def _scan_convert_ad_grad(bmode, base, frac, fan, adj):
    fast_call(_scan_convert_bwd, bmode, fan, adj.off, adj.pix, adj.w)


@ti.kernel
def copy_frame(fans: ti.template(), b: ti.i32, fan: ti.template()):
    """fan (H, W) = fans[b] of a batch (B, H, W)."""
    for y, x in fan:
        fan[y, x] = fans[b, y, x]


@ti.kernel
def copy_field(src: ti.template(), dst: ti.template()):
    for I in ti.grouped(dst):
        dst[I] = src[I]
