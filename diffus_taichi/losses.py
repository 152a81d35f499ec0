"""Image similarity losses as differentiable Taichi kernels (rendered image vs a fixed target).

All losses take the rendered image ``a`` (H, W) field, compare it with a fixed target ``b``
(numpy, H x W) over an optional mask (e.g. the fan sector), and accumulate a 0-D ``loss``
field, so that ``ti.ad.Tape(loss)`` differentiates them. Lower is better for all of them:

* ``mse``:   mean over the mask of (a - b)^2
* ``ncc``:   1 - global normalised cross-correlation
* ``lncc``:  1 - mean NCC over square patches (``patch_px``)
* ``lc2``:   1 - LC2 (Wein et al. 2008): per patch, least-squares fit of the target
             b ~ c1 a + c2 |grad a| + c3; LC2 = sum_p var_p(b) R^2_p / sum_p var_p(b)
Target statistics are precomputed once in NumPy; only terms that depend on ``a`` are kernels.
"""
import numpy as np
import taichi as ti

from .launch import fast_call

LOSSES = ("mse", "ncc", "lncc", "lc2")
EPS = 1e-12


@ti.kernel
def _gauss_blur_x(src: ti.template(), taps: ti.template(), K: ti.template(), dst: ti.template()):
    for y, x in dst:
        acc = 0.0
        for k in ti.static(range(-K, K + 1)):
            j = ti.min(ti.max(x + k, 0), dst.shape[1] - 1)
            acc += taps[k + K] * src[y, j]
        dst[y, x] = acc


@ti.kernel
def _gauss_blur_y(src: ti.template(), taps: ti.template(), K: ti.template(), dst: ti.template()):
    for y, x in dst:
        acc = 0.0
        for k in ti.static(range(-K, K + 1)):
            i = ti.min(ti.max(y + k, 0), dst.shape[0] - 1)
            acc += taps[k + K] * src[i, x]
        dst[y, x] = acc


def gaussian_taps(sigma_px: float) -> np.ndarray:
    K = max(1, int(np.ceil(3 * sigma_px)))
    t = np.exp(-0.5 * (np.arange(-K, K + 1) / sigma_px) ** 2)
    return t / t.sum()


def blur_np(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Same separable Gaussian blur in NumPy (edge-clamped), for targets."""
    if sigma_px <= 0:
        return img
    t = gaussian_taps(sigma_px)
    K = (len(t) - 1) // 2
    out = np.zeros_like(img, dtype=np.float64)
    rows = np.pad(img, ((0, 0), (K, K)), mode="edge")
    for k in range(len(t)):
        out += t[k] * rows[:, k:k + img.shape[1]]
    cols = np.pad(out, ((K, K), (0, 0)), mode="edge")
    out2 = np.zeros_like(out)
    for k in range(len(t)):
        out2 += t[k] * cols[k:k + img.shape[0], :]
    return out2


# ---------------------------------------------------------------------------------------------
@ti.kernel
def weighted_sum(a: ti.template(), w: ti.template(), out: ti.template()):
    """out += sum(a * w)  (vector-Jacobian products)."""
    for I in ti.grouped(a):
        out[None] += a[I] * w[I]


# Reductions run one image row per thread (rows in parallel, columns serial, accumulating into
# a per-row slot), then over rows: a single global accumulator hit by every pixel is ~10x slower
# on CPU (atomic contention), forward and backward.
@ti.kernel
def _mse_rows(a: ti.template(), b: ti.template(), m: ti.template(), rows: ti.template()):
    for y in range(a.shape[0]):
        for x in range(a.shape[1]):
            d = a[y, x] - b[y, x]
            rows[y, 0] += m[y, x] * d * d


@ti.kernel
def _sum_rows(rows: ti.template(), k: ti.template(), s: ti.template()):
    """s[j] += sum_y rows[y, j] for j < k."""
    for y in range(rows.shape[0]):
        for j in ti.static(range(k)):
            s[j] += rows[y, j]


@ti.kernel
def _mse_final(s: ti.template(), inv_n: float, loss: ti.template()):
    loss[None] += s[0] * inv_n


@ti.kernel
def _ncc_fwd(a: ti.template(), m: ti.template(), bc: ti.template(), inv_n: float, var_b: float,
             rows: ti.template(), st: ti.template(), loss: ti.template()):
    """Two-pass (centred) moments, accurate in f32: S0 = sum m a, then with mu = S0 / n,
    T1 = sum m (a - mu)^2 and T2 = sum bc a; per row (register sums, which LLVM vectorises
    into 8 partial sums on CPU: ~4x faster than sums kept in the rows field, and closer to
    the f64 values), then over rows. st = (S0, T1, T2, sum m (a - mu)) for the adjoint."""
    for y in range(a.shape[0]):
        s0 = 0.0
        for x in range(a.shape[1]):
            s0 += m[y, x] * a[y, x]
        rows[y, 0] = s0
    for j in range(4):
        st[j] = 0.0
    for y in range(a.shape[0]):
        st[0] += rows[y, 0]
    for y in range(a.shape[0]):
        mu = st[0] * inv_n
        c0, t1, t2 = 0.0, 0.0, 0.0
        for x in range(a.shape[1]):
            d = a[y, x] - mu
            c0 += m[y, x] * d
            t1 += m[y, x] * d * d
            t2 += bc[y, x] * a[y, x]
        rows[y, 0], rows[y, 1], rows[y, 2] = c0, t1, t2
    for y in range(a.shape[0]):
        st[1] += rows[y, 1]
        st[2] += rows[y, 2]
        st[3] += rows[y, 0]
    for _ in range(1):
        loss[None] += 1.0 - st[2] * inv_n / ti.sqrt(st[1] * inv_n * var_b + 1e-12)


@ti.kernel
def _ncc_bwd(a: ti.template(), m: ti.template(), bc: ti.template(), inv_n: float, var_b: float,
             rows: ti.template(), st: ti.template(), loss: ti.template()):
    """a.grad += dL/da: L = 1 - T2 n^-1 / sqrt(T1 n^-1 var_b + 1e-12), T1 = sum m (a - mu)^2,
    mu = S0 / n, T2 = sum bc a; the term through mu (dT1/dmu = -2 sum m (a - mu), 0 in exact
    arithmetic) is kept as in the automatic adjoint: dropping it moved f32 gradients ~1e-4."""
    for _ in range(1):                       # coefficients (st[4:8]), once
        gl = loss.grad[None]
        den = ti.sqrt(st[1] * inv_n * var_b + 1e-12)
        g1 = gl * st[2] * inv_n / (den * den) * (0.5 / den) * var_b * inv_n
        st[4], st[5] = -gl * inv_n / den, 2.0 * g1
        st[6], st[7] = -2.0 * g1 * st[3] * inv_n, st[0] * inv_n
    for y in range(a.shape[0]):
        c4, c5, c6, c7 = st[4], st[5], st[6], st[7]   # (in registers: the loop vectorises)
        for x in range(a.shape[1]):
            g = c4 * bc[y, x] + m[y, x] * (c5 * (a[y, x] - c7) + c6)
            a.grad[y, x] = a.grad[y, x] + g


@ti.ad.grad_replaced
def ncc(a, m, bc, inv_n, var_b, rows, st, loss):
    """loss += 1 - NCC(a, target) over the mask m (H, W); bc = m (target - mean), var_b its
    variance, inv_n = 1 / sum m; rows (H, 3), st (8,): scratch (no gradient). Hand-written
    adjoint (one parallel pass) instead of the automatic ones of the staged kernels."""
    fast_call(_ncc_fwd, a, m, bc, float(inv_n), float(var_b), rows, st, loss)


@ti.ad.grad_for(ncc)
def _ncc_grad(a, m, bc, inv_n, var_b, rows, st, loss):
    fast_call(_ncc_bwd, a, m, bc, float(inv_n), float(var_b), rows, st, loss)


@ti.kernel
def _patch_moments(a: ti.template(), m: ti.template(), bc: ti.template(), patch: ti.i32,
                   s: ti.template()):
    """One thread per patch, pixels serial: deterministic sums, no atomic contention."""
    for py, px in ti.ndrange(s.shape[0], s.shape[1]):
        for dy in range(patch):
            for dx in range(patch):
                y, x = py * patch + dy, px * patch + dx
                if y < a.shape[0] and x < a.shape[1]:
                    v = a[y, x]
                    s[py, px, 0] += m[y, x] * v
                    s[py, px, 1] += m[y, x] * v * v
                    s[py, px, 2] += bc[y, x] * v


@ti.kernel
def _lncc_final(s: ti.template(), n: ti.template(), var_b: ti.template(), w: ti.template(),
                loss: ti.template()):
    for py, px in n:
        if w[py, px] > 0.0:
            inv = 1.0 / n[py, px]
            mu = s[py, px, 0] * inv
            var_a = s[py, px, 1] * inv - mu * mu
            ncc = s[py, px, 2] * inv / ti.sqrt(ti.max(var_a, 0.0) * var_b[py, px] + 1e-12)
            loss[None] += w[py, px] * (1.0 - ncc)


@ti.kernel
def _grad_mag(a: ti.template(), g: ti.template()):
    for y, x in a:
        H, W = a.shape[0], a.shape[1]
        gx = 0.5 * (a[y, ti.min(x + 1, W - 1)] - a[y, ti.max(x - 1, 0)])
        gy = 0.5 * (a[ti.min(y + 1, H - 1), x] - a[ti.max(y - 1, 0), x])
        g[y, x] = ti.sqrt(gx * gx + gy * gy + 1e-8)


@ti.kernel
def _lc2_sums(a: ti.template(), g: ti.template(), m: ti.template(), b: ti.template(),
              patch: ti.i32, s: ti.template()):
    """Per patch (one thread each, pixels serial): normal equations of b ~ c1 a + c2 g + c3."""
    for py, px in ti.ndrange(s.shape[0], s.shape[1]):
        for dy in range(patch):
            for dx in range(patch):
                y, x = py * patch + dy, px * patch + dx
                if y < a.shape[0] and x < a.shape[1]:
                    w = m[y, x]
                    va, vg, vb = a[y, x], g[y, x], b[y, x]
                    s[py, px, 0] += w * va * va
                    s[py, px, 1] += w * va * vg
                    s[py, px, 2] += w * va
                    s[py, px, 3] += w * vg * vg
                    s[py, px, 4] += w * vg
                    s[py, px, 5] += w * va * vb
                    s[py, px, 6] += w * vg * vb
                    s[py, px, 7] += w * vb
                    s[py, px, 8] += w


@ti.kernel
def _lc2_final(s: ti.template(), sbb: ti.template(), var_b: ti.template(), w: ti.template(),
               loss: ti.template()):
    for py, px in var_b:
        if w[py, px] > 0.0:
            A = ti.Matrix([[s[py, px, 0], s[py, px, 1], s[py, px, 2]],
                           [s[py, px, 1], s[py, px, 3], s[py, px, 4]],
                           [s[py, px, 2], s[py, px, 4], s[py, px, 8]]])
            A += ti.Matrix.identity(float, 3) * 1e-6 * s[py, px, 8]
            r = ti.Vector([s[py, px, 5], s[py, px, 6], s[py, px, 7]])
            c = A.inverse() @ r
            ss_res = sbb[py, px] - c.dot(r)
            n = s[py, px, 8]
            r2 = 1.0 - ss_res / (n * var_b[py, px])
            loss[None] += w[py, px] * (1.0 - r2)


class ImageLoss:
    """A differentiable loss between a rendered (H, W) field and a fixed target.

    Args:
        kind: mse | ncc | lncc | lc2; target: (H, W) array; mask: (H, W) bool/float or None
        (all pixels); patch_px: patch size for lncc/lc2; real: Taichi float type.
    Use ``loss.compute(field)`` inside a Tape; the value is ``loss.value[None]``.
    ``set_target`` swaps the target (same shape) without allocating new fields.
    """

    def __init__(self, kind: str, target: np.ndarray, mask=None, patch_px: int = 16, real=ti.f32,
                 needs_grad: bool = True):
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
        self.kind, self.patch = kind, int(patch_px)
        self._npr = np.float64 if real == ti.f64 else np.float32
        arrays = self._prepare(target, mask)
        H, W = self.shape
        # allocate every field first (one Taichi SNode tree), then upload
        self.value = ti.field(real, shape=(), needs_grad=needs_grad)
        self._const = {k: ti.field(real, shape=v.shape) for k, v in arrays.items()}
        if kind == "ncc":
            self.nrows = ti.field(real, shape=(H, 3))     # scratch, assigned (no reset)
            self.st = ti.field(real, shape=8)
        elif kind == "mse":
            self.rows = ti.field(real, shape=(H, 3), needs_grad=needs_grad)
            self.rows2 = ti.field(real, shape=(H, 3), needs_grad=needs_grad)
            self.s = ti.field(real, shape=3, needs_grad=needs_grad)
            self.t = ti.field(real, shape=3, needs_grad=needs_grad)
        else:
            PH, PW = arrays["w"].shape
            self.s = ti.field(real, shape=(PH, PW, 9 if kind == "lc2" else 3), needs_grad=needs_grad)
            if kind == "lc2":
                self.g = ti.field(real, shape=(H, W), needs_grad=needs_grad)
        for k, f in self._const.items():
            setattr(self, k, f)
        self._upload(arrays)

    def set_target(self, target: np.ndarray, mask=None) -> None:
        """New target (and mask) of the same shape, reusing the fields."""
        shape = self.shape
        arrays = self._prepare(target, mask)
        if self.shape != shape or any(arrays[k].shape != f.shape for k, f in self._const.items()):
            raise ValueError(f"set_target: shape {self.shape} differs from {shape}")
        self._upload(arrays)

    def _upload(self, arrays: dict) -> None:
        for k, v in arrays.items():
            self._const[k].from_numpy(np.asarray(v, dtype=self._npr))

    def _prepare(self, target, mask) -> dict:
        """Target-only statistics (NumPy). Sets shape, inv_n (and var_b for ncc)."""
        kind = self.kind
        target = np.asarray(target, dtype=np.float64)
        if target.ndim != 2:
            raise ValueError(f"target image must be 2-D (H, W), got shape {target.shape}")
        if not np.all(np.isfinite(target)):
            raise ValueError("target image contains NaN or Inf")
        m = np.ones_like(target) if mask is None else np.asarray(mask, dtype=np.float64)
        if m.shape != target.shape:
            raise ValueError(f"mask shape {m.shape} != target shape {target.shape}")
        if m.sum() < 4:
            raise ValueError("loss mask selects fewer than 4 pixels")
        self.shape = target.shape
        H, W = target.shape
        n = float(m.sum())
        self.inv_n = 1.0 / n
        out = {"m": m}
        if kind == "mse":
            out["b"] = target
        elif kind == "ncc":
            mu_b = (m * target).sum() / n
            bc = m * (target - mu_b)
            self.var_b = float((bc * (target - mu_b)).sum() / n)
            if self.var_b <= 0:
                raise ValueError("target image is constant inside the mask: NCC undefined")
            out["bc"] = bc
        else:
            P = self.patch
            PH, PW = -(-H // P), -(-W // P)
            mp, tp = np.zeros((PH * P, PW * P)), np.zeros((PH * P, PW * P))
            mp[:H, :W], tp[:H, :W] = m, target
            mp4 = mp.reshape(PH, P, PW, P)
            tp4 = tp.reshape(PH, P, PW, P)
            cnt = mp4.sum((1, 3))
            with np.errstate(invalid="ignore", divide="ignore"):
                mu = (mp4 * tp4).sum((1, 3)) / cnt
                var = (mp4 * (tp4 - mu[:, None, :, None]) ** 2).sum((1, 3)) / cnt
            valid = (cnt >= 0.5 * P * P) & (var > 1e-6)
            if not valid.any():
                raise ValueError(f"no {P}x{P} patch of the target has both mask coverage and "
                                 "texture: cannot compute a local similarity")
            var = np.where(valid, var, 1.0)
            if kind == "lncc":
                out["w"] = valid / valid.sum()
                out["bc"] = (mp4 * (tp4 - np.nan_to_num(mu)[:, None, :, None])).reshape(
                    PH * P, PW * P)[:H, :W]
                out["n"] = np.maximum(cnt, 1)
            else:
                out["w"] = valid * var / (valid * var).sum()
                out["b"] = target
                out["sbb"] = (mp4 * tp4 ** 2).sum((1, 3))
            out["var_b"] = var
        return out

    def compute(self, a) -> None:
        """Launch the loss kernels on image field ``a`` (accumulates into ``self.value``)."""
        if self.kind == "mse":
            _mse_rows(a, self.b, self.m, self.rows)
            _sum_rows(self.rows, 1, self.s)
            _mse_final(self.s, self.inv_n, self.value)
        elif self.kind == "ncc":
            ncc(a, self.m, self.bc, self.inv_n, self.var_b, self.nrows, self.st, self.value)
        elif self.kind == "lncc":
            _patch_moments(a, self.m, self.bc, self.patch, self.s)
            _lncc_final(self.s, self.n, self.var_b, self.w, self.value)
        else:
            _grad_mag(a, self.g)
            _lc2_sums(a, self.g, self.m, self.b, self.patch, self.s)
            _lc2_final(self.s, self.sbb, self.var_b, self.w, self.value)

    def reset(self) -> None:
        """Zero the accumulators (needed when evaluating without a Tape, which zeroes them)."""
        self.value[None] = 0
        for name in ("s", "t", "rows", "rows2"):
            if hasattr(self, name):
                getattr(self, name).fill(0)
