"""Small MLP mapping: MRI intensity (and optionally neighbourhood features) -> acoustic
properties, evaluated per voxel in a Taichi kernel whose layers are unrolled with ``ti.static``
(the differentiable pattern that is exact on CPU and Vulkan, TAICHI_NOTES §2.7).

Features per voxel (``MLPParams.features``, any of, in this order):

* ``intensity``: normalised MRI intensity I in [0, 1];
* ``local_mean``: mean of I over the 6 face neighbours (edge voxels clamped);
* ``gradient_mm``: |grad I| in 1/mm (central differences through the affine) times 1 mm.

Network: ``features (F,) -> [tanh(W h + b)] x len(hidden) -> o (3,)`` and

    Z = Z_REF exp(o0) MRayl (always > 0),  alpha = softplus(o1) dB/cm/MHz,  scattering = softplus(o2).

Parameters are one flat vector (layer by layer: W (out, in) row-major, then b (out,)), held in
a Taichi field so ``ti.ad.Tape`` gives d loss / d weights. A new MLP starts close to the default
T1 transfer function (:func:`init_weights`), so it renders like the ``transfer`` mapping before
any training; ``MLPParams(init_knots=K, init_knot_weight=w)`` starts it at any other knot table
instead, monotone or not (the default T2 mapping, :func:`~diffus_taichi.acoustics.t2_mapping`,
uses this with :data:`~diffus_taichi.acoustics.T2_MLP_KNOTS`).
"""

import math
from dataclasses import dataclass, field

import numpy as np
import taichi as ti

from .echo import Z_REF

FEATURES = ("intensity", "local_mean", "gradient_mm")


def _softplus(x):
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def _softplus_inv(y):
    y = np.maximum(np.asarray(y, np.float64), 1e-4)
    return y + np.log(-np.expm1(-y))


@dataclass
class MLPParams:
    """Weights of the MLP mapping. ``weights``: flat (P,) float64 vector (see module doc).

    Without ``weights`` they are initialised by :func:`init_weights` to reproduce
    ``init_knots`` ((K, 3) [MRayl, dB/cm/MHz, scattering] at K uniform intensities on [0, 1];
    default: the T1 transfer knots), with extra least-squares weight ``init_knot_weight`` on
    the knots themselves (0: the plain fit of the piecewise-linear curve). Both are only used
    for that (``init_knots`` is reset to None; files keep only features, hidden and weights).
    """

    features: tuple = ("intensity",)
    hidden: tuple = (16,)
    weights: np.ndarray | None = None
    seed: int = 0
    init_knots: np.ndarray | None = field(default=None, repr=False)
    init_knot_weight: float = field(default=0.0, repr=False)

    def __post_init__(self):
        self.features = tuple(self.features)
        self.hidden = tuple(int(h) for h in self.hidden)
        bad = [f for f in self.features if f not in FEATURES]
        if bad or not self.features or len(set(self.features)) != len(self.features):
            raise ValueError(f"MLP features must be distinct names from {FEATURES}, got {self.features}")
        if not self.hidden or len(self.hidden) > 3 or any(h < 1 or h > 64 for h in self.hidden):
            raise ValueError(f"MLP hidden layer sizes must be 1-3 layers of 1..64 units, got {self.hidden}")
        if self.weights is None:
            self.weights = init_weights(self, self.init_knots, knot_weight=self.init_knot_weight)
        w = np.asarray(self.weights, dtype=np.float64).ravel()
        if w.shape != (self.n_params,):
            raise ValueError(f"MLP with features {self.features} and hidden {self.hidden} needs "
                             f"{self.n_params} weights, got {w.size}")
        if not np.all(np.isfinite(w)):
            raise ValueError("MLP weights contain NaN or Inf")
        self.weights = w
        self.init_knots = None

    @property
    def sizes(self) -> tuple:
        return (len(self.features),) + self.hidden + (3,)

    @property
    def n_params(self) -> int:
        s = self.sizes
        return sum(a * b + b for a, b in zip(s[:-1], s[1:]))

    def layers(self, w=None):
        """[(W (out, in), b (out,)), ...] views of the flat vector ``w`` (default: own)."""
        w = self.weights if w is None else w
        out, o = [], 0
        for a, b in zip(self.sizes[:-1], self.sizes[1:]):
            out.append((w[o:o + a * b].reshape(b, a), w[o + a * b:o + a * b + b]))
            o += a * b + b
        return out

    def raw_outputs(self, x: np.ndarray, w=None) -> np.ndarray:
        """(N, 3) pre-activation outputs o for features x (N, F) (NumPy, float64)."""
        h = np.asarray(x, np.float64)
        L = self.layers(w)
        for i, (W, b) in enumerate(L):
            h = h @ W.T + b
            if i < len(L) - 1:
                h = np.tanh(h)
        return h

    def props(self, x: np.ndarray, w=None) -> np.ndarray:
        """(N, 3) [MRayl, dB/cm/MHz, scattering] for features x (N, F) (NumPy reference)."""
        o = self.raw_outputs(x, w)
        return np.stack([Z_REF * np.exp(o[:, 0]), _softplus(o[:, 1]), _softplus(o[:, 2])], -1)

    def curve(self, n: int = 101) -> tuple[np.ndarray, np.ndarray]:
        """Properties along intensity 0..1 with the other features at their flat-tissue value
        (local mean = intensity, gradient 0): (n,), (n, 3)."""
        t = np.linspace(0.0, 1.0, n)
        return t, self.props(flat_features(self, t))

    def to_dict(self) -> dict:
        return {"features": list(self.features), "hidden": list(self.hidden),
                "weights": [float(v) for v in self.weights]}

    @classmethod
    def from_dict(cls, d: dict) -> "MLPParams":
        try:
            return cls(features=tuple(d["features"]), hidden=tuple(d["hidden"]),
                       weights=np.asarray(d["weights"], dtype=np.float64))
        except KeyError as e:
            raise ValueError(f"MLP mapping: missing key {e} (need features, hidden, weights)") from None


def init_weights(p: MLPParams, knots=None, n_fit: int = 257, ridge: float = 1e-4,
                 knot_weight: float = 0.0) -> np.ndarray:
    """Deterministic start that reproduces the piecewise-linear curve through ``knots`` ((K, 3)
    [MRayl, dB/cm/MHz, scattering] at K uniform intensities on [0, 1]; default: the T1 transfer
    knots; any shape, monotone or not) on flat tissue (local mean = intensity, gradient 0):
    first-layer units are soft steps tanh(2H (I - c_u)) with centres c_u spread over [0, 1]
    (I = mean of the intensity features; small random weights on the gradient feature), deeper
    layers small random (near-linear), output layer by ridge least squares on ``n_fit``
    intensities (small weights, so f32 sums of W h do not cancel).

    ``knot_weight`` > 0 adds the K knot intensities to the fit with that many times the weight of
    one fit point, so a curve with sharp turns (the T2 curve) is matched at its knots (where the
    tissue values are) rather than smoothed through them; 0 gives the plain fit (the default T1
    start, unchanged)."""
    from .acoustics import T1_TRANSFER_KNOTS, check_knots

    knots = check_knots(T1_TRANSFER_KNOTS if knots is None else knots, "MLP init")
    knot_weight = float(knot_weight)
    if not math.isfinite(knot_weight) or knot_weight < 0:
        raise ValueError(f"MLP init: knot_weight must be a finite number >= 0, got {knot_weight!r}")
    rng = np.random.default_rng(p.seed)
    w = np.zeros(p.n_params)
    L = p.layers(w)
    W, b = L[0]
    H = W.shape[0]
    inten = [i for i, f in enumerate(p.features) if f != "gradient_mm"]
    c = (np.arange(H) + 0.5) / H
    for i, f in enumerate(p.features):
        W[:, i] = 2.0 * H / len(inten) if f != "gradient_mm" else rng.normal(0.0, 0.1, H)
    b[:] = -2.0 * H * c
    for W, b in L[1:-1]:
        W[:] = rng.normal(0.0, 0.5 / math.sqrt(W.shape[1]), W.shape)
        b[:] = rng.normal(0.0, 0.1, b.shape)
    K = len(knots)
    tk = np.linspace(0.0, 1.0, K)
    t = np.linspace(0.0, 1.0, n_fit)
    sw = np.ones(n_fit)
    if knot_weight > 0:
        t = np.r_[t, tk]
        sw = np.r_[sw, np.full(K, knot_weight)]
    h = flat_features(p, t)
    for W, b in L[:-1]:
        h = np.tanh(h @ W.T + b)
    target = np.stack([np.interp(t, tk, knots[:, c]) for c in range(3)], -1)
    o = np.stack([np.log(target[:, 0] / Z_REF), _softplus_inv(target[:, 1]),
                  _softplus_inv(target[:, 2])], -1)
    A = np.c_[h, np.ones(len(t))]
    Aw = A * sw[:, None] if knot_weight > 0 else A     # (A.T @ A exactly as before for 0)
    sol = np.linalg.solve(A.T @ Aw + ridge * n_fit * np.eye(A.shape[1]), Aw.T @ o)
    W, b = L[-1]
    W[:] = sol[:-1].T
    b[:] = sol[-1]
    return w


def flat_features(p: MLPParams, t) -> np.ndarray:
    """(N, F) features of flat tissue of intensities t (N,): local mean = t, gradient 0."""
    t = np.asarray(t, np.float64)
    cols = {"intensity": t, "local_mean": t, "gradient_mm": np.zeros_like(t)}
    return np.stack([cols[f] for f in p.features], -1)


# ---------------------------------------------------------------------------------------------
# Taichi kernel (one compiled variant per (features, hidden) layout)
# ---------------------------------------------------------------------------------------------
_KERNELS: dict = {}


def _layout(params: MLPParams):
    sizes = params.sizes
    offs, o = [], 0
    for a, b in zip(sizes[:-1], sizes[1:]):
        offs.append((o, o + a * b))
        o += a * b + b
    aoff = [int(v) for v in np.cumsum((0,) + sizes)]
    use = tuple(f in params.features for f in FEATURES)
    fidx = tuple(params.features.index(f) if f in params.features else -1 for f in FEATURES)
    return sizes, offs, aoff, use, fidx


def _mlp_func(params: MLPParams):
    """``ti.func`` (c0, xm, xp, ym, yp, zm, zp, gradT, w) -> props (3,): the MLP of one voxel
    from its intensity c0 and its 6 face neighbours (edge-clamped), shared by the field and the
    NumPy-slab kernels."""
    sizes, offs, aoff, use, fidx = _layout(params)
    NA = aoff[-1]
    n_layers = len(sizes) - 1

    @ti.func
    def f(c0, xm, xp, ym, yp, zm, zp, gradT: ti.template(), w: ti.template()):
        h = ti.Vector.zero(float, NA)
        if ti.static(use[0]):
            h[fidx[0]] = c0
        if ti.static(use[1]):
            h[fidx[1]] = (xm + xp + ym + yp + zm + zp) / 6.0
        if ti.static(use[2]):
            g = gradT[None] @ ti.Vector([0.5 * (xp - xm), 0.5 * (yp - ym), 0.5 * (zp - zm)])
            h[fidx[2]] = ti.sqrt(g.dot(g) + 1e-12)
        for layer in ti.static(range(n_layers)):
            a, b = ti.static(sizes[layer], sizes[layer + 1])
            wo, bo = ti.static(offs[layer])
            ia, ib = ti.static(aoff[layer], aoff[layer + 1])
            for u in ti.static(range(b)):
                acc = w[bo + u]
                for v in ti.static(range(a)):
                    acc += w[wo + u * a + v] * h[ia + v]
                if ti.static(layer < n_layers - 1):
                    h[ib + u] = ti.tanh(acc)
                else:
                    h[ib + u] = acc
        o0, o1, o2 = h[NA - 3], h[NA - 2], h[NA - 1]
        # Z - Z_REF = Z_REF (exp(o0) - 1) = Z_REF 2t / (1 - t), t = tanh(o0 / 2): no
        # cancellation for small o0 (f32 keeps the relative precision of the deviation)
        t = ti.tanh(0.5 * o0)
        dz = Z_REF * 2.0 * t / (1.0 - t)
        sp1 = ti.max(o1, 0.0) + ti.log(1.0 + ti.exp(-ti.abs(o1)))
        sp2 = ti.max(o2, 0.0) + ti.log(1.0 + ti.exp(-ti.abs(o2)))
        return ti.Vector([dz, sp1, sp2])

    return f, use


def mlp_kernel(params: MLPParams):
    """Kernel ``k(vol, chan, gradT, w, props)``: props[I] = [Z - Z_REF, alpha, scattering] of the
    MLP with flat weights field ``w`` at every voxel of ``vol`` (features from channel ``chan``;
    ``gradT`` (3x3) maps index-space gradients to world mm). Differentiable (full storage)."""
    key = ("field", params.features, params.hidden)
    if key in _KERNELS:
        return _KERNELS[key]
    mlp, use = _mlp_func(params)

    @ti.kernel
    def k(vol: ti.template(), chan: ti.template(), gradT: ti.template(), w: ti.template(),
          props: ti.template()):
        for i, j, l in vol:
            X, Y, Z = vol.shape[0], vol.shape[1], vol.shape[2]
            c0 = ti.cast(vol[i, j, l][chan], float)
            xm, xp, ym, yp, zm, zp = c0, c0, c0, c0, c0, c0
            if ti.static(use[1] or use[2]):
                xm = ti.cast(vol[ti.max(i - 1, 0), j, l][chan], float)
                xp = ti.cast(vol[ti.min(i + 1, X - 1), j, l][chan], float)
                ym = ti.cast(vol[i, ti.max(j - 1, 0), l][chan], float)
                yp = ti.cast(vol[i, ti.min(j + 1, Y - 1), l][chan], float)
                zm = ti.cast(vol[i, j, ti.max(l - 1, 0)][chan], float)
                zp = ti.cast(vol[i, j, ti.min(l + 1, Z - 1)][chan], float)
            props[i, j, l] = mlp(c0, xm, xp, ym, yp, zm, zp, gradT, w)

    _KERNELS[key] = k
    return k


def mlp_kernel_nd(params: MLPParams):
    """Kernel ``k(ch, s0, x0, nx, X, chan, gradT, w, props)`` of lean/compact storage: the same
    per-voxel MLP as :func:`mlp_kernel` for the rows x0 .. x0 + nx - 1 of a volume of X rows,
    read from the NumPy channel slab ``ch`` (X', Y, Z, C) that starts at row s0 and includes the
    neighbour rows (edge-clamped at 0 and X - 1); written to ``props`` cast to its dtype."""
    key = ("ndarray", params.features, params.hidden)
    if key in _KERNELS:
        return _KERNELS[key]
    mlp, use = _mlp_func(params)

    @ti.kernel
    def k(ch: ti.types.ndarray(ndim=4), s0: int, x0: int, nx: int, X: int, chan: ti.template(),
          gradT: ti.template(), w: ti.template(), props: ti.template()):
        for ii, j, l in ti.ndrange(nx, ch.shape[1], ch.shape[2]):
            Y, Z = ch.shape[1], ch.shape[2]
            i = x0 + ii
            c0 = ti.cast(ch[i - s0, j, l, chan], float)
            xm, xp, ym, yp, zm, zp = c0, c0, c0, c0, c0, c0
            if ti.static(use[1] or use[2]):
                xm = ti.cast(ch[ti.max(i - 1, 0) - s0, j, l, chan], float)
                xp = ti.cast(ch[ti.min(i + 1, X - 1) - s0, j, l, chan], float)
                ym = ti.cast(ch[i - s0, ti.max(j - 1, 0), l, chan], float)
                yp = ti.cast(ch[i - s0, ti.min(j + 1, Y - 1), l, chan], float)
                zm = ti.cast(ch[i - s0, j, ti.max(l - 1, 0), chan], float)
                zp = ti.cast(ch[i - s0, j, ti.min(l + 1, Z - 1), chan], float)
            props[i, j, l] = ti.cast(mlp(c0, xm, xp, ym, yp, zm, zp, gradT, w), props.dtype)

    _KERNELS[key] = k
    return k


def features_np(volume, params: MLPParams) -> np.ndarray:
    """(X, Y, Z, F) feature volume in NumPy, as the kernel computes it (for checks and plots)."""
    I = volume.channels[..., volume.intensity_index].astype(np.float64)
    P = np.pad(I, 1, mode="edge")
    xm, xp = P[:-2, 1:-1, 1:-1], P[2:, 1:-1, 1:-1]
    ym, yp = P[1:-1, :-2, 1:-1], P[1:-1, 2:, 1:-1]
    zm, zp = P[1:-1, 1:-1, :-2], P[1:-1, 1:-1, 2:]
    cols = {"intensity": I, "local_mean": (xm + xp + ym + yp + zm + zp) / 6.0}
    if "gradient_mm" in params.features:
        gidx = np.stack([0.5 * (xp - xm), 0.5 * (yp - ym), 0.5 * (zp - zm)], -1)
        g = gidx @ volume.world_to_voxel[:3, :3]
        cols["gradient_mm"] = np.sqrt((g * g).sum(-1) + 1e-12)
    return np.stack([cols[f] for f in params.features], -1)
