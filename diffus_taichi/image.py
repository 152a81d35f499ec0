"""Image formation along and across lines: complex RF = specular echo + gain x tissue-fixed
scatterers (I/Q, see march.scatterer_sum), axial complex (I/Q) Gabor pulse, depth-dependent lateral
Gaussian beam, envelope, time-gain compensation and log compression to a dynamic range. All per-sample parallel kernels with
compile-time (``ti.static``) tap loops. The two stencils (axial, lateral) have hand-written
backward kernels in gather form (their automatic backward scatters with atomics, ~20x slower on
CPU); the rest use Taichi's automatic gradient, exact on every backend.

Shapes: every field is (n_lines, n_samples); ``taps_i/taps_q`` (2K+1,), ``lat_w`` (2M+1, n_samples)
(the field; :func:`lateral_weights` returns its transpose).
"""

import math

import numpy as np
import taichi as ti

DB_PER_NEPER = 20.0 / math.log(10.0)



def axial_taps(probe, max_half: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """In-phase and quadrature taps (2K+1,) of the pulse-echo Gabor pulse sampled at the sample
    spacing: Gaussian envelope with the probe's axial FWHM, carrier 2 k0 (round trip).
    The envelope of a unit reflector is 1 at its own sample."""
    dz = probe.sample_spacing_mm
    sigma = probe.axial_fwhm_mm() / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    half = int(min(max_half, max(1, math.ceil(3.0 * sigma / dz))))
    d = np.arange(-half, half + 1) * dz
    env = np.exp(-0.5 * (d / sigma) ** 2)
    k2 = 4.0 * math.pi / probe.wavelength_mm
    return env * np.cos(k2 * d), env * np.sin(k2 * d)


def lateral_weights(probe, max_half: int = 10) -> np.ndarray:
    """(n_samples, 2M+1) normalised Gaussian weights across neighbouring lines at each depth,
    with the beam FWHM of :meth:`Probe.lateral_fwhm_mm` converted to line spacings."""
    depth = probe.sample_depths_mm()
    fwhm = probe.lateral_fwhm_mm(depth)
    spacing = line_spacing_mm(probe)
    sigma_lines = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0))) / spacing
    half = int(min(max_half, max(1, math.ceil(3.0 * float(sigma_lines.max())))))
    m = np.arange(-half, half + 1)
    w = np.exp(-0.5 * (m[None, :] / np.maximum(sigma_lines[:, None], 1e-3)) ** 2)
    return w / w.sum(axis=1, keepdims=True)


def elevation_planes(probe, n_planes: int) -> tuple[np.ndarray, np.ndarray]:
    """Elevation offsets (n_samples, n) in mm and amplitude weights (n_samples, n), sum of squared
    weights 1: n = 1 is the central plane; n = 3 adds planes at +-sigma of the pulse-echo
    elevation beam profile (Gaussian with FWHM :meth:`Probe.elevation_fwhm_mm` at each depth),
    weighted by that profile (exp(-1/2) relative to the centre)."""
    S = probe.n_samples
    if n_planes == 1:
        return np.zeros((S, 1)), np.ones((S, 1))
    if n_planes != 3:
        raise ValueError(f"elevation_planes must be 1 or 3, got {n_planes!r}")
    sig = probe.elevation_fwhm_mm(probe.sample_depths_mm()) / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    off = np.stack([-sig, np.zeros(S), sig], 1)
    w = np.array([math.exp(-0.5), 1.0, math.exp(-0.5)])
    return off, np.tile(w / np.sqrt(np.sum(w ** 2)), (S, 1))


@ti.kernel
def form_rf(echo: ti.template(), gain: ti.template(), scat: ti.template(), scat_q: ti.template(),
            rf: ti.template(), rf_q: ti.template()):
    """Complex RF: rf = echo + gain * scat, rf_q = gain * scat_q (pressure amplitude,
    dimensionless; the specular echo sits on its sample, the scatterers carry their own phase)."""
    for r, s in rf:
        rf[r, s] = echo[r, s] + gain[r, s] * scat[r, s]
        rf_q[r, s] = gain[r, s] * scat_q[r, s]


@ti.kernel
def _axial_iq(rf: ti.template(), rf_q: ti.template(), taps_i: ti.template(),
              taps_q: ti.template(), K: ti.template(), cplx: ti.template(), iq_i: ti.template(),
              iq_q: ti.template()):
    for r, s in rf:
        S = rf.shape[1]
        ai, aq = 0.0, 0.0
        for k in ti.static(range(-K, K + 1)):
            j = s - k
            if 0 <= j < S:
                ai += taps_i[k + K] * rf[r, j]
                aq += taps_q[k + K] * rf[r, j]
                if ti.static(cplx):
                    ai -= taps_q[k + K] * rf_q[r, j]
                    aq += taps_i[k + K] * rf_q[r, j]
        iq_i[r, s] = ai
        iq_q[r, s] = aq


@ti.kernel
def _axial_iq_bwd(rf: ti.template(), rf_q: ti.template(), taps_i: ti.template(),
                  taps_q: ti.template(), K: ti.template(), cplx: ti.template(),
                  iq_i: ti.template(), iq_q: ti.template()):
    """Transpose stencil as a gather (no atomics): rf.grad[r, j] = sum_k conj-free transpose of
    the complex taps applied to iq.grad[r, j+k]."""
    for r, j in rf:
        S = rf.shape[1]
        acc, accq = 0.0, 0.0
        for k in ti.static(range(-K, K + 1)):
            s = j + k
            if 0 <= s < S:
                acc += taps_i[k + K] * iq_i.grad[r, s] + taps_q[k + K] * iq_q.grad[r, s]
                if ti.static(cplx):
                    accq += -taps_q[k + K] * iq_i.grad[r, s] + taps_i[k + K] * iq_q.grad[r, s]
        rf.grad[r, j] += acc
        if ti.static(cplx):
            rf_q.grad[r, j] += accq


@ti.ad.grad_replaced
def axial_iq(rf, rf_q, taps_i, taps_q, K, cplx, iq_i, iq_q):
    """Complex pulse along each line: iq = sum_k taps[k] (rf + i rf_q)[s - k] (zero beyond the
    line; taps = taps_i + i taps_q). ``cplx`` (static) False: rf_q is taken as 0 (not read)."""
    _axial_iq(rf, rf_q, taps_i, taps_q, K, cplx, iq_i, iq_q)


@ti.ad.grad_for(axial_iq)
def _axial_iq_grad(rf, rf_q, taps_i, taps_q, K, cplx, iq_i, iq_q):
    _axial_iq_bwd(rf, rf_q, taps_i, taps_q, K, cplx, iq_i, iq_q)


@ti.func
def lateral_at(iq_i: ti.template(), iq_q: ti.template(), lat_w: ti.template(),
               M: ti.template(), n_lines, r, s):
    """Lateral beam sum (I, Q) at line r, sample s: lat_w[m + M, s] iq[r + m, s] summed over
    |m| <= M, lines of the same frame only (rays r = b n_lines + l)."""
    lr = r % n_lines
    ai, aq = 0.0, 0.0
    for m in ti.static(range(-M, M + 1)):
        if 0 <= lr + m < n_lines:
            w = lat_w[m + M, s]
            ai += w * iq_i[r + m, s]
            aq += w * iq_q[r + m, s]
    return ai, aq


@ti.func
def lateral_at_transpose(gl_i: ti.template(), gl_q: ti.template(), lat_w: ti.template(),
                         M: ti.template(), n_lines, j, s):
    """Transpose of :func:`lateral_at` as a gather (no atomics): sum over |m| <= M of
    lat_w[m + M, s] gl[j - m, s], lines of the same frame only."""
    lj = j % n_lines
    gi, gq = 0.0, 0.0
    for m in ti.static(range(-M, M + 1)):
        if 0 <= lj - m < n_lines:
            w = lat_w[m + M, s]
            gi += w * gl_i[j - m, s]
            gq += w * gl_q[j - m, s]
    return gi, gq


@ti.kernel
def _lateral_sum(iq_i: ti.template(), iq_q: ti.template(), lat_w: ti.template(),
                 M: ti.template(), n_lines: ti.i32, li: ti.template(), lq: ti.template()):
    for r, s in li:
        li[r, s], lq[r, s] = lateral_at(iq_i, iq_q, lat_w, M, n_lines, r, s)


@ti.kernel
def _lateral_sum_bwd(iq_i: ti.template(), iq_q: ti.template(), lat_w: ti.template(),
                     M: ti.template(), n_lines: ti.i32, li: ti.template(), lq: ti.template()):
    """Transpose stencil as a gather: iq.grad[j, s] = sum_m w[m, s] l.grad[j - m, s]."""
    for j, s in li:
        gi, gq = lateral_at_transpose(li.grad, lq.grad, lat_w, M, n_lines, j, s)
        iq_i.grad[j, s] += gi
        iq_q.grad[j, s] += gq


@ti.ad.grad_replaced
def lateral_sum(iq_i, iq_q, lat_w, M, n_lines, li, lq):
    """Coherent lateral beam sum across the lines of each frame (weights lat_w[m, s], depth
    dependent; rays r = b n_lines + l)."""
    _lateral_sum(iq_i, iq_q, lat_w, M, n_lines, li, lq)


@ti.ad.grad_for(lateral_sum)
def _lateral_sum_grad(iq_i, iq_q, lat_w, M, n_lines, li, lq):
    _lateral_sum_bwd(iq_i, iq_q, lat_w, M, n_lines, li, lq)


@ti.kernel
def envelope(li: ti.template(), lq: ti.template(), env: ti.template()):
    """env = |I + iQ|."""
    for r, s in env:
        env[r, s] = ti.sqrt(li[r, s] * li[r, s] + lq[r, s] * lq[r, s] + 1e-24)


def _tent_energy(v: np.ndarray, spacing_cells: float, n_off: int = 64) -> float:
    """E_f sum_c (sum_k v_k tent(f + k a - c))^2: energy of weights v (K,) at points spaced a
    (cells) after trilinear (tent) gathering from a unit lattice, averaged over offsets f."""
    return float(_tent_energies(np.asarray(v, dtype=np.float64)[None, :], [spacing_cells], n_off)[0])


def _tent_energies(V: np.ndarray, spacing_cells, n_off: int = 64,
                   max_bins: int = 1 << 20) -> np.ndarray:
    """:func:`_tent_energy` of each row of V (D, K) with its own spacing (D,), vectorised over
    rows and offsets f = (i + 0.5) / n_off: point k at x = k a + f reaches only the cells
    floor(x) and floor(x) + 1 (weights 1 - |x - c|), so the gathered sums per cell are one
    bincount (rows batched so that at most ``max_bins`` cells exist at a time)."""
    V = np.asarray(V, dtype=np.float64)
    D, K = V.shape
    a = np.broadcast_to(np.asarray(spacing_cells, dtype=np.float64), (D,))
    f = (np.arange(n_off) + 0.5) / n_off
    out = np.empty(D)
    ncell_all = (np.floor((K - 1) * a + f[-1]).astype(np.int64) + 2)   # cells 0 .. floor(x)+1
    r = 0
    while r < D:
        n = 1
        while r + n < D and (n + 1) * n_off * int(ncell_all[r:r + n + 1].max()) <= max_bins:
            n += 1
        ncell = int(ncell_all[r:r + n].max())
        x = (np.arange(K)[None, None, :] * a[r:r + n, None, None]) + f[None, :, None]  # (n, F, K)
        c0 = np.floor(x)
        w0 = np.clip(1.0 - np.abs(x - c0), 0.0, None) * V[r:r + n, None, :]
        w1 = np.clip(1.0 - np.abs(x - (c0 + 1.0)), 0.0, None) * V[r:r + n, None, :]
        base = (np.arange(n * n_off, dtype=np.int64) * ncell).reshape(n, n_off, 1)
        i0 = base + c0.astype(np.int64)
        g = np.bincount(np.concatenate([i0.ravel(), i0.ravel() + 1]),
                        weights=np.concatenate([w0.ravel(), w1.ravel()]),
                        minlength=n * n_off * ncell).reshape(n, n_off, ncell)
        out[r:r + n] = np.sum(g * g, axis=2).sum(axis=1) / n_off
        r += n
    return out


def speckle_power_factor(taps_i, taps_q, lat_w, step_mm=None, cell_mm=None, elev_w=None,
                         line_spacing_mm=None) -> np.ndarray | float:
    """Expected |I + iQ|^2 of the coherent scatterer image per unit scattering strength squared,
    per sample depth (n_samples,) (used by ``speckle='mean'``).

    A scatterer reaches output sample s through every axial tap k with the same phase (the tap
    phase 2k k dz cancels its phase relative to sample s - k) and through every line of the
    lateral sum with the same phase (same depth, nearly the same direction), so
    E|iq|^2 = AMP^2 E_axial E_lateral(s) E_elev with, per axis, E = mean over lattice offsets of
    sum_cells (sum_taps |weight| tent(position - cell))^2 (:func:`_tent_energy`), rays taken along a
    lattice axis; the 3 elevation planes are > 1 cell apart, hence independent.
    Without ``step_mm`` / ``cell_mm``: the earlier scalar approximation (independent samples)."""
    from .march import SCAT_AMP

    env = np.sqrt(np.asarray(taps_i) ** 2 + np.asarray(taps_q) ** 2)
    lat_w = np.asarray(lat_w, dtype=np.float64)
    if step_mm is None or cell_mm is None:
        return float(0.3 * np.sum(env ** 2) * np.mean(np.sum(lat_w ** 2, 1)))
    S = lat_w.shape[0]
    el = np.ones(S) if elev_w is None else np.sum(np.asarray(elev_w) ** 2, 1)
    ax = _tent_energy(env, step_mm / cell_mm)
    sp = np.broadcast_to(np.asarray(line_spacing_mm, dtype=np.float64), (S,)) / cell_mm
    # the lateral factor changes slowly with depth: evaluate it on <= 64 depths, interpolate
    idx = np.unique(np.linspace(0, S - 1, min(S, 64)).astype(int))
    lat = np.interp(np.arange(S), idx, _tent_energies(lat_w[idx], sp[idx]))
    return SCAT_AMP ** 2 * ax * lat * (2.0 / 3.0) * el


def lateral_frame_mask(n_lines: int, M: int) -> np.ndarray:
    """(n_lines, 2M+1) array: 1 where entry m of line l's lateral window, line l - M + m, lies in
    the frame (0 <= l - M + m < n_lines), else 0."""
    rows = np.arange(n_lines)[:, None] - M + np.arange(2 * M + 1)[None, :]
    return ((rows >= 0) & (rows < n_lines)).astype(np.float64)


def line_spacing_mm(probe) -> np.ndarray:
    """(n_samples,) distance between neighbouring lines at each sample depth (mm)."""
    depth = probe.sample_depths_mm()
    if probe.kind == "linear":
        return np.full_like(depth, probe.width_mm / (probe.n_lines - 1))
    dth = math.radians(probe.fov_deg) / (probe.n_lines - 1)
    return np.maximum((probe.radius_mm + depth) * dth, 1e-6)


@ti.kernel
def add_incoherent(env: ti.template(), gain: ti.template(), strength: ti.template(),
                   c: ti.template(), out: ti.template()):
    """Expected envelope of specular echo plus diffuse scattering of given strength:
    out = sqrt(env^2 + c[s] (gain strength)^2) (speckle-free, smooth in the pose); c (n_samples,)
    from :func:`speckle_power_factor`."""
    for r, s in env:
        d = gain[r, s] * strength[r, s]
        out[r, s] = ti.sqrt(env[r, s] * env[r, s] + c[s] * d * d)


@ti.kernel
def log_compress(env: ti.template(), gain_db: float, tgc_db_per_sample: float,
                 dynamic_range_db: float, bmode: ti.template()):
    """bmode = clip((20 log10(env) + gain + TGC * s + DR) / DR, 0, 1)."""
    for r, s in env:
        db = DB_PER_NEPER * ti.log(env[r, s]) + gain_db + tgc_db_per_sample * s
        bmode[r, s] = ti.min(ti.max((db + dynamic_range_db) / dynamic_range_db, 0.0), 1.0)
