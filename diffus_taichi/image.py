"""Image formation along and across lines: RF = specular echo + gain x tissue-fixed scatterers,
axial complex (I/Q) pulse, depth-dependent lateral Gaussian beam, envelope, time-gain
compensation and log compression to a dynamic range. All per-sample parallel kernels with
compile-time (``ti.static``) tap loops. The two stencils (axial, lateral) have hand-written
backward kernels in gather form (their automatic backward scatters with atomics, ~20x slower on
CPU); the rest use Taichi's automatic gradient, exact on every backend.

Shapes: every field is (n_lines, n_samples); ``taps_i/taps_q`` (2K+1,), ``lat_w`` (n_samples, 2M+1).
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
    if probe.kind == "linear":
        spacing = np.full_like(depth, probe.width_mm / (probe.n_lines - 1))
    else:
        dth = math.radians(probe.fov_deg) / (probe.n_lines - 1)
        spacing = np.maximum((probe.radius_mm + depth) * dth, 1e-6)
    sigma_lines = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0))) / spacing
    half = int(min(max_half, max(1, math.ceil(3.0 * float(sigma_lines.max())))))
    m = np.arange(-half, half + 1)
    w = np.exp(-0.5 * (m[None, :] / np.maximum(sigma_lines[:, None], 1e-3)) ** 2)
    return w / w.sum(axis=1, keepdims=True)


@ti.kernel
def form_rf(echo: ti.template(), gain: ti.template(), scat: ti.template(), rf: ti.template()):
    """rf = echo + gain * scat (pressure amplitude, dimensionless)."""
    for r, s in rf:
        rf[r, s] = echo[r, s] + gain[r, s] * scat[r, s]


@ti.kernel
def _axial_iq(rf: ti.template(), taps_i: ti.template(), taps_q: ti.template(), K: ti.template(),
              iq_i: ti.template(), iq_q: ti.template()):
    for r, s in rf:
        S = rf.shape[1]
        ai, aq = 0.0, 0.0
        for k in ti.static(range(-K, K + 1)):
            j = s - k
            if 0 <= j < S:
                ai += taps_i[k + K] * rf[r, j]
                aq += taps_q[k + K] * rf[r, j]
        iq_i[r, s] = ai
        iq_q[r, s] = aq


@ti.kernel
def _axial_iq_bwd(rf: ti.template(), taps_i: ti.template(), taps_q: ti.template(),
                  K: ti.template(), iq_i: ti.template(), iq_q: ti.template()):
    """Transpose stencil as a gather (no atomics): rf.grad[r, j] = sum_k taps[k] iq.grad[r, j+k]."""
    for r, j in rf:
        S = rf.shape[1]
        acc = 0.0
        for k in ti.static(range(-K, K + 1)):
            s = j + k
            if 0 <= s < S:
                acc += taps_i[k + K] * iq_i.grad[r, s] + taps_q[k + K] * iq_q.grad[r, s]
        rf.grad[r, j] += acc


@ti.ad.grad_replaced
def axial_iq(rf, taps_i, taps_q, K, iq_i, iq_q):
    """Complex pulse along each line: iq = sum_k taps[k] rf[s - k] (zero beyond the line)."""
    _axial_iq(rf, taps_i, taps_q, K, iq_i, iq_q)


@ti.ad.grad_for(axial_iq)
def _axial_iq_grad(rf, taps_i, taps_q, K, iq_i, iq_q):
    _axial_iq_bwd(rf, taps_i, taps_q, K, iq_i, iq_q)


@ti.kernel
def _lateral_sum(iq_i: ti.template(), iq_q: ti.template(), lat_w: ti.template(),
                 M: ti.template(), li: ti.template(), lq: ti.template()):
    for r, s in li:
        R = li.shape[0]
        ai, aq = 0.0, 0.0
        for m in ti.static(range(-M, M + 1)):
            j = r + m
            if 0 <= j < R:
                w = lat_w[s, m + M]
                ai += w * iq_i[j, s]
                aq += w * iq_q[j, s]
        li[r, s] = ai
        lq[r, s] = aq


@ti.kernel
def _lateral_sum_bwd(iq_i: ti.template(), iq_q: ti.template(), lat_w: ti.template(),
                     M: ti.template(), li: ti.template(), lq: ti.template()):
    """Transpose stencil as a gather: iq.grad[j, s] = sum_m w[s, m] l.grad[j - m, s]."""
    for j, s in li:
        R = li.shape[0]
        gi, gq = 0.0, 0.0
        for m in ti.static(range(-M, M + 1)):
            r = j - m
            if 0 <= r < R:
                w = lat_w[s, m + M]
                gi += w * li.grad[r, s]
                gq += w * lq.grad[r, s]
        iq_i.grad[j, s] += gi
        iq_q.grad[j, s] += gq


@ti.ad.grad_replaced
def lateral_sum(iq_i, iq_q, lat_w, M, li, lq):
    """Coherent lateral beam sum across lines (weights lat_w[s, m], depth dependent)."""
    _lateral_sum(iq_i, iq_q, lat_w, M, li, lq)


@ti.ad.grad_for(lateral_sum)
def _lateral_sum_grad(iq_i, iq_q, lat_w, M, li, lq):
    _lateral_sum_bwd(iq_i, iq_q, lat_w, M, li, lq)


@ti.kernel
def envelope(li: ti.template(), lq: ti.template(), env: ti.template()):
    """env = |I + iQ|."""
    for r, s in env:
        env[r, s] = ti.sqrt(li[r, s] * li[r, s] + lq[r, s] * lq[r, s] + 1e-24)


def speckle_power_factor(taps_i, taps_q, lat_w) -> float:
    """Expected |I + iQ|^2 per unit scatterer variance: value-noise variance (~0.3 for trilinear
    interpolation of unit-variance lattice values) x axial tap energy x mean lateral tap energy."""
    import numpy as np

    return float(0.3 * (np.sum(taps_i ** 2) + np.sum(taps_q ** 2)) * np.mean(np.sum(lat_w ** 2, 1)))


@ti.kernel
def add_incoherent(env: ti.template(), gain: ti.template(), strength: ti.template(), c: float,
                   out: ti.template()):
    """Expected envelope of specular echo plus diffuse scattering of given strength:
    out = sqrt(env^2 + c (gain strength)^2) (speckle-free, smooth in the pose)."""
    for r, s in env:
        d = gain[r, s] * strength[r, s]
        out[r, s] = ti.sqrt(env[r, s] * env[r, s] + c * d * d)


@ti.kernel
def log_compress(env: ti.template(), gain_db: float, tgc_db_per_sample: float,
                 dynamic_range_db: float, bmode: ti.template()):
    """bmode = clip((20 log10(env) + gain + TGC * s + DR) / DR, 0, 1)."""
    for r, s in env:
        db = DB_PER_NEPER * ti.log(env[r, s]) + gain_db + tgc_db_per_sample * s
        bmode[r, s] = ti.min(ti.max((db + dynamic_range_db) / dynamic_range_db, 0.0), 1.0)
