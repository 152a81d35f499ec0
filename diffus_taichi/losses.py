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


@ti.kernel
def _mse(a: ti.template(), b: ti.template(), m: ti.template(), inv_n: float, loss: ti.template()):
    for I in ti.grouped(a):
        d = a[I] - b[I]
        loss[None] += m[I] * d * d * inv_n


@ti.kernel
def _moments(a: ti.template(), m: ti.template(), bc: ti.template(), s: ti.template()):
    """s[0] += m a, s[1] += m a^2, s[2] += bc a   (bc = centred, masked target)."""
    for I in ti.grouped(a):
        v = a[I]
        s[0] += m[I] * v
        s[1] += m[I] * v * v
        s[2] += bc[I] * v


@ti.kernel
def _ncc_final(s: ti.template(), inv_n: float, var_b: float, loss: ti.template()):
    mu = s[0] * inv_n
    var_a = s[1] * inv_n - mu * mu
    loss[None] += 1.0 - s[2] * inv_n / ti.sqrt(ti.max(var_a, 0.0) * var_b + 1e-12)


@ti.kernel
def _patch_moments(a: ti.template(), m: ti.template(), bc: ti.template(), patch: ti.i32,
                   s: ti.template()):
    for y, x in a:
        p = ti.Vector([y // patch, x // patch])
        v = a[y, x]
        s[p, 0] += m[y, x] * v
        s[p, 1] += m[y, x] * v * v
        s[p, 2] += bc[y, x] * v


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
    """Per patch: normal equations of b ~ c1 a + c2 g + c3 (9 sums)."""
    for y, x in a:
        p = ti.Vector([y // patch, x // patch])
        w = m[y, x]
        va, vg, vb = a[y, x], g[y, x], b[y, x]
        s[p, 0] += w * va * va
        s[p, 1] += w * va * vg
        s[p, 2] += w * va
        s[p, 3] += w * vg * vg
        s[p, 4] += w * vg
        s[p, 5] += w * va * vb
        s[p, 6] += w * vg * vb
        s[p, 7] += w * vb
        s[p, 8] += w


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
    """

    def __init__(self, kind: str, target: np.ndarray, mask=None, patch_px: int = 16, real=ti.f32,
                 needs_grad: bool = True):
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")
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
        self.kind, self.shape, self.patch = kind, target.shape, int(patch_px)
        npr = np.float64 if real == ti.f64 else np.float32
        H, W = target.shape

        def fld(arr=None, shape=(H, W)):
            f = ti.field(real, shape=shape)
            if arr is not None:
                f.from_numpy(np.asarray(arr, dtype=npr))
            return f

        self.value = ti.field(real, shape=(), needs_grad=needs_grad)
        self.m = fld(m)
        n = float(m.sum())
        self.inv_n = 1.0 / n
        if kind == "mse":
            self.b = fld(target)
        elif kind == "ncc":
            mu_b = (m * target).sum() / n
            bc = m * (target - mu_b)
            self.var_b = float((bc * (target - mu_b)).sum() / n)
            if self.var_b <= 0:
                raise ValueError("target image is constant inside the mask: NCC undefined")
            self.bc = fld(bc)
            self.s = ti.field(real, shape=3, needs_grad=needs_grad)
        else:
            P = self.patch
            PH, PW = -(-H // P), -(-W // P)
            pad = np.zeros((PH * P, PW * P))
            mp, tp = pad.copy(), pad.copy()
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
                w = valid / valid.sum()
                bc = (mp4 * (tp4 - np.nan_to_num(mu)[:, None, :, None])).reshape(PH * P, PW * P)[:H, :W]
                self.bc = fld(bc)
                self.n = fld(np.maximum(cnt, 1), (PH, PW))
            else:
                w = valid * var / (valid * var).sum()
                self.b = fld(target)
                self.sbb = fld((mp4 * tp4 ** 2).sum((1, 3)), (PH, PW))
                self.g = ti.field(real, shape=(H, W), needs_grad=needs_grad)
            self.var_b = fld(var, (PH, PW))
            self.w = fld(w.astype(np.float64), (PH, PW))
            self.s = ti.field(real, shape=(PH, PW, 9 if kind == "lc2" else 3), needs_grad=needs_grad)

    def compute(self, a) -> None:
        """Launch the loss kernels on image field ``a`` (accumulates into ``self.value``)."""
        if self.kind == "mse":
            _mse(a, self.b, self.m, self.inv_n, self.value)
        elif self.kind == "ncc":
            _moments(a, self.m, self.bc, self.s)
            _ncc_final(self.s, self.inv_n, self.var_b, self.value)
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
        if hasattr(self, "s"):
            self.s.fill(0)
