"""Fused differentiable kernels of the ``primary`` chain under ``ti.ad.Tape``, each with a
hand-written adjoint (``ti.ad.grad_replaced``), between the march outputs and the B-mode lines.

The staged Tape path runs echo.step_terms -> exclusive_cumsum -> primary_combine ->
image.form_rf -> axial_iq -> lateral_sum -> envelope -> (add_incoherent) -> log_compress, one
kernel and one gradient field per stage. Here

1. :func:`echo_iq` (rays in parallel, samples serial): z, alpha, scat, scat_q, cosw (rays,
   samples) -> two-way gain and axial I/Q (rays, samples). The log transmission is summed in a
   register (the exclusive cumsum), the complex RF goes through a (2K+1)-sample shift register;
   the adjoint is one reverse sweep per ray (the transpose axial pulse gathered from iq.grad, the
   cumsum adjoint carried in a register, z/cosw adjoints of neighbouring samples carried too);
2. :func:`lateral_envelope_log`: per sample, the lateral beam sum (stored in li/lq for the
   adjoint), envelope, expected diffuse intensity for ``speckle='mean'`` and log compression; its
   adjoint is a per-sample pass into (gli, glq) then the transpose lateral stencil as a gather.

Same arithmetic as the staged kernels, term by term (values equal to a few f32 ulps); adjoints
follow Taichi's rules at ties (max/min send the adjoint to the right operand on equality).
Only z, alpha, scat, scat_q, cosw, gain, iq_i, iq_q and bmode need gradient fields.
No ``from __future__ import annotations`` here: the module holds Taichi kernels.
"""
import taichi as ti

from .echo import Z_REF, refl
from .fused import bmode_value, pulse, shift_in, tap_registers
from .image import DB_PER_NEPER, lateral_at, lateral_at_transpose


@ti.kernel
def _echo_iq_fwd(z: ti.template(), alpha: ti.template(), scat: ti.template(),
                 scat_q: ti.template(), cosw: ti.template(), np_step: float,
                 taps_i: ti.template(), taps_q: ti.template(), K: ti.template(),
                 mode: ti.template(), gain: ti.template(), iq_i: ti.template(),
                 iq_q: ti.template(), pad: ti.template()):
    for rr in range(z.shape[0] * pad):
        if rr % pad != 0:
            continue
        r = rr // pad
        S = z.shape[1]
        cum = 0.0                                    # exclusive sum of the log transmission
        tpi, tpq = tap_registers(taps_i, taps_q, K)
        bi = ti.Vector([0.0] * (2 * K + 1))        # RF shift register (I, Q)
        bq = ti.Vector([0.0] * (2 * K + 1))
        for s in range(S + K):
            rf, rfq = 0.0, 0.0
            if s < S:
                g = ti.exp(cum)
                a = alpha[r, s] * np_step
                lt, e = 0.0, 0.0
                if s < S - 1:
                    rc = refl(z[r, s], z[r, s + 1])
                    lt = ti.log(ti.max(1.0 - rc * rc, 1e-30))
                    e = ti.max(cosw[r, s], cosw[r, s + 1]) * rc * g
                cum += lt - 2.0 * a
                gain[r, s] = g
                rf = e
                if ti.static(mode == 0):
                    rf = e + g * scat[r, s]
                    rfq = g * scat_q[r, s]
            bi = shift_in(bi, rf, K)
            bq = shift_in(bq, rfq, K)
            s0 = s - K                               # register holds rf[s0 - K .. s0 + K]
            if s0 >= 0:
                iq_i[r, s0], iq_q[r, s0] = pulse(bi, bq, tpi, tpq, K, ti.static(mode == 0))


@ti.kernel
def _echo_iq_bwd(z: ti.template(), alpha: ti.template(), scat: ti.template(),
                 scat_q: ti.template(), cosw: ti.template(), np_step: float,
                 taps_i: ti.template(), taps_q: ti.template(), K: ti.template(),
                 mode: ti.template(), gain: ti.template(), iq_i: ti.template(),
                 iq_q: ti.template(), pad: ti.template()):
    for rr in range(z.shape[0] * pad):
        if rr % pad != 0:
            continue
        r = rr // pad
        S = z.shape[1]
        gcum = 0.0              # adjoint of logt[s] = sum over s' > s of the adjoint of cum[s']
        pz, pc = 0.0, 0.0       # adjoints of z[r, s + 1], cosw[r, s + 1] from step s + 1
        tpi, tpq = tap_registers(taps_i, taps_q, K)
        for kk in range(S):
            s = S - 1 - kk
            grf, grfq = 0.0, 0.0                     # transpose axial pulse (image._axial_iq_bwd)
            for k in ti.static(range(-K, K + 1)):
                j = s + k
                if 0 <= j < S:
                    gi, gq = iq_i.grad[r, j], iq_q.grad[r, j]
                    grf += tpi[k + K] * gi + tpq[k + K] * gq
                    if ti.static(mode == 0):
                        grfq += -tpq[k + K] * gi + tpi[k + K] * gq
            g = gain[r, s]
            gg = 0.0                                 # adjoint of gain[r, s]
            if ti.static(mode == 0):
                gg = grf * scat[r, s] + grfq * scat_q[r, s]
                scat.grad[r, s] = scat.grad[r, s] + grf * g
                scat_q.grad[r, s] = scat_q.grad[r, s] + grfq * g
            if ti.static(mode == 1):
                gg = gain.grad[r, s]
            if s < S - 1:
                z0, z1 = z[r, s], z[r, s + 1]
                den = z1 + z0 + 2.0 * Z_REF
                rc = (z1 - z0) / den
                iden = 1.0 / den
                c0, c1 = cosw[r, s], cosw[r, s + 1]
                w = ti.max(c0, c1)
                gg += grf * w * rc
                grc = grf * w * g
                gw = grf * rc * g
                gc0, gc1 = 0.0, gw
                if c0 > c1:
                    gc0, gc1 = gw, 0.0
                q = 1.0 - rc * rc
                if q > 1e-30:
                    grc += gcum / q * (-2.0 * rc)
                z.grad[r, s + 1] = z.grad[r, s + 1] + pz + grc * (1.0 - rc) * iden
                cosw.grad[r, s + 1] = cosw.grad[r, s + 1] + pc + gc1
                pz = -grc * (1.0 + rc) * iden
                pc = gc0
            alpha.grad[r, s] = alpha.grad[r, s] - 2.0 * np_step * gcum
            gcum += gg * g
        z.grad[r, 0] = z.grad[r, 0] + pz
        cosw.grad[r, 0] = cosw.grad[r, 0] + pc


@ti.ad.grad_replaced
def echo_iq(z, alpha, scat, scat_q, cosw, np_step, taps_i, taps_q, K, mode, gain, iq_i, iq_q,
            pad=1):
    """Primary echo model + complex RF + axial pulse: gain[r, s] = exp(sum_{j<s} logt[r, j])
    (logt as echo.step_terms), rf = w r gain (+ gain scat, rf_q = gain scat_q for mode 0),
    iq = sum_k taps[k] (rf + i rf_q)[s - k]. Fields (rays, samples); np_step: nepers per
    (dB/cm/MHz) over one sample step; taps (2K+1,); mode (static) 0 coherent, 1 'mean', 2 'off'
    (scat, scat_q not read, rf_q = 0); pad: ray loop stride (backend.ray_loop_pad)."""
    _echo_iq_fwd(z, alpha, scat, scat_q, cosw, float(np_step), taps_i, taps_q, K, mode, gain,
                 iq_i, iq_q, pad)


@ti.ad.grad_for(echo_iq)
def _echo_iq_grad(z, alpha, scat, scat_q, cosw, np_step, taps_i, taps_q, K, mode, gain, iq_i,
                  iq_q, pad=1):
    _echo_iq_bwd(z, alpha, scat, scat_q, cosw, float(np_step), taps_i, taps_q, K, mode, gain,
                 iq_i, iq_q, pad)


@ti.kernel
def _lel_fwd(iq_i: ti.template(), iq_q: ti.template(), lat_w: ti.template(), M: ti.template(),
             n_lines: ti.template(), mean: ti.template(), gain: ti.template(),
             strength: ti.template(),
             c: ti.template(), gain_db: float, tgc: float, dr: float, li: ti.template(),
             lq: ti.template(), gli: ti.template(), glq: ti.template(), bmode: ti.template()):
    for r, s in bmode:
        li[r, s], lq[r, s] = lateral_at(iq_i, iq_q, lat_w, M, n_lines, r, s)
    for r, s in bmode:                 # (a separate loop: ~25 % faster on CPU)
        d, cs = (gain[r, s] * strength[r, s], c[s]) if ti.static(mean) else (0.0, 0.0)
        bmode[r, s] = bmode_value(li[r, s], lq[r, s], s, mean, d, cs, gain_db, tgc, dr)


@ti.kernel
def _lel_bwd(iq_i: ti.template(), iq_q: ti.template(), lat_w: ti.template(), M: ti.template(),
             n_lines: ti.template(), mean: ti.template(), gain: ti.template(),
             strength: ti.template(),
             c: ti.template(), gain_db: float, tgc: float, dr: float, li: ti.template(),
             lq: ti.template(), gli: ti.template(), glq: ti.template(), bmode: ti.template()):
    for r, s in bmode:                 # adjoint of log_compress, (add_incoherent), envelope
        b = bmode[r, s]
        gy = 0.0
        if 0.0 < b < 1.0:              # unclipped (min/max pass the adjoint only strictly)
            gy = bmode.grad[r, s]
        ai, aq = li[r, s], lq[r, s]
        env = ti.sqrt(ai * ai + aq * aq + 1e-24)
        ge = gy / dr * DB_PER_NEPER
        if ti.static(mean):
            d = gain[r, s] * strength[r, s]
            em = ti.sqrt(env * env + c[s] * d * d)
            gx = ge / em * (0.5 / em)
            gd = gx * c[s] * 2.0 * d
            gain.grad[r, s] = gain.grad[r, s] + gd * strength[r, s]
            strength.grad[r, s] = strength.grad[r, s] + gd * gain[r, s]
            ge = gx * 2.0 * env
        else:
            ge = ge / env
        gx = ge * (0.5 / env)
        gli[r, s] = 2.0 * ai * gx
        glq[r, s] = 2.0 * aq * gx
    for j, s in bmode:                 # transpose lateral stencil (image._lateral_sum_bwd)
        gi, gq = lateral_at_transpose(gli, glq, lat_w, M, n_lines, j, s)
        iq_i.grad[j, s] = iq_i.grad[j, s] + gi
        iq_q.grad[j, s] = iq_q.grad[j, s] + gq


@ti.ad.grad_replaced
def lateral_envelope_log(iq_i, iq_q, lat_w, M, n_lines, mean, gain, strength, c, gain_db, tgc,
                         dr, li, lq, gli, glq, bmode):
    """B-mode lines bmode (rays, samples) in [0, 1] from the axial I/Q: lateral sum with
    lat_w[s, m] over the n_lines (static) lines of each frame (kept in li, lq), envelope, with
    ``mean`` (static) sqrt(env^2 + c[s] (gain strength)^2), then
    clip((20 log10 env + gain_db + tgc s + dr) / dr, 0, 1) (dB, dB per sample).
    gli, glq (rays, samples): adjoint scratch (no gradient)."""
    _lel_fwd(iq_i, iq_q, lat_w, M, int(n_lines), mean, gain, strength, c, float(gain_db),
             float(tgc), float(dr), li, lq, gli, glq, bmode)


@ti.ad.grad_for(lateral_envelope_log)
def _lateral_envelope_log_grad(iq_i, iq_q, lat_w, M, n_lines, mean, gain, strength, c, gain_db,
                               tgc, dr, li, lq, gli, glq, bmode):
    _lel_bwd(iq_i, iq_q, lat_w, M, int(n_lines), mean, gain, strength, c, float(gain_db),
             float(tgc), float(dr), li, lq, gli, glq, bmode)
