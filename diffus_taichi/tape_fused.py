"""Fused differentiable kernels of the ``primary`` chain under ``ti.ad.Tape``, each with a
hand-written adjoint (``ti.ad.grad_replaced``), between the march outputs and the B-mode lines.

The staged Tape path runs echo.step_terms -> exclusive_cumsum -> primary_combine ->
image.form_rf -> axial_iq -> lateral_sum -> envelope -> (add_incoherent) -> log_compress, one
kernel and one gradient field per stage. Here

1. :func:`echo_iq` (one task per ray): z, alpha, scat, scat_q, cosw (rays, samples) -> two-way
   gain and axial I/Q (rays, samples). On GPU backends one serial loop per ray: the log
   transmission summed in a register (the exclusive cumsum), the complex RF through a
   (2K+1)-sample shift register; the adjoint one reverse sweep per ray (the transpose axial
   pulse gathered from iq.grad, the cumsum adjoint carried in a register, z/cosw adjoints of
   neighbouring samples carried too). On CPU the same terms in loops over the samples that
   vectorise (see fused.py for what that takes), with only the cumulative sums serial;
2. :func:`lateral_envelope_log`: the lateral beam sum (stored in li/lq for the adjoint),
   envelope, expected diffuse intensity for ``speckle='mean'`` and log compression; its
   adjoint a pass into (gli, glq) then the transpose lateral stencil as a gather. Per sample
   on GPU backends, per line (vectorised across samples) on CPU.

Same arithmetic as the staged kernels, term by term (values equal to a few f32 ulps); adjoints
follow Taichi's rules at ties (max/min send the adjoint to the right operand on equality).
Only z, alpha, scat, scat_q, cosw, gain, iq_i, iq_q and bmode need gradient fields.
No ``from __future__ import annotations`` here: the module holds Taichi kernels.
"""
import taichi as ti

from .echo import Z_REF, refl
from .fused import (_given, bmode_value, lateral_lines, pulse, pulse_line, shift_in,
                    tap_registers)
from .image import DB_PER_NEPER, lateral_at, lateral_at_transpose
from .launch import fast_call
from .vecmath import exp_real, log_real


@ti.kernel
def _echo_iq_fwd(z: ti.template(), alpha: ti.template(), scat: ti.template(),
                 scat_q: ti.template(), cosw: ti.template(), np_step: float,
                 taps_i: ti.template(), taps_q: ti.template(), K: ti.template(),
                 mode: ti.template(), gain: ti.template(), iq_i: ti.template(),
                 iq_q: ti.template(), pad: ti.template(), rf_i: ti.template(),
                 rf_q: ti.template()):
    if ti.static(_given(rf_i)):
        _echo_iq_fwd_split(z, alpha, scat, scat_q, cosw, np_step, taps_i, taps_q, K, mode,
                           gain, iq_i, iq_q, pad, rf_i, rf_q)
    else:
        _echo_iq_fwd_serial(z, alpha, scat, scat_q, cosw, np_step, taps_i, taps_q, K, mode,
                            gain, iq_i, iq_q, pad)


@ti.func
def _echo_iq_fwd_split(z: ti.template(), alpha: ti.template(), scat: ti.template(),
                       scat_q: ti.template(), cosw: ti.template(), np_step: ti.template(),
                       taps_i: ti.template(), taps_q: ti.template(), K: ti.template(),
                       mode: ti.template(), gain: ti.template(), iq_i: ti.template(),
                       iq_q: ti.template(), pad: ti.template(), rf_i: ti.template(),
                       rf_q: ti.template()):
    """CPU form of :func:`_echo_iq_fwd_serial` (same terms, same order): per ray, the step terms
    in a loop over samples that vectorises, the exclusive cumulative sum (one add per sample)
    in a serial one, the gains and the complex RF (into the scratch rows rf_i, rf_q) in a
    vectorised one, then fused.pulse_line."""
    for rr in range(z.shape[0] * pad):
        if rr % pad != 0:
            continue
        r = rr // pad
        S = z.shape[1]
        tpi, tpq = tap_registers(taps_i, taps_q, K)  # (field reads before the loops)
        for s in range(S - 1):       # gain <- log transmission of step s, rf_i <- echo / gain
            rc = refl(z[r, s], z[r, s + 1])
            gain[r, s] = log_real(ti.max(1.0 - rc * rc, 1e-30)) - 2.0 * (alpha[r, s] * np_step)
            rf_i[r, s] = ti.max(cosw[r, s], cosw[r, s + 1]) * rc
        gain[r, S - 1] = 0.0 - 2.0 * (alpha[r, S - 1] * np_step)
        rf_i[r, S - 1] = 0.0
        cum = 0.0
        for s in range(S):           # gain <- exclusive sum of the log transmission
            lt = gain[r, s]
            gain[r, s] = cum
            cum += lt
        for s in range(S):
            g = exp_real(gain[r, s])
            gain[r, s] = g
            e = rf_i[r, s] * g
            if ti.static(mode == 0):
                rf_i[r, s] = e + g * scat[r, s]
                rf_q[r, s] = g * scat_q[r, s]
            else:
                rf_i[r, s] = e
        pulse_line(rf_i, rf_q, tpi, tpq, K, ti.static(mode == 0), r, iq_i, iq_q)


@ti.func
def _echo_iq_fwd_serial(z: ti.template(), alpha: ti.template(), scat: ti.template(),
                        scat_q: ti.template(), cosw: ti.template(), np_step: ti.template(),
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
                g = exp_real(cum)
                a = alpha[r, s] * np_step
                lt, e = 0.0, 0.0
                if s < S - 1:
                    rc = refl(z[r, s], z[r, s + 1])
                    lt = log_real(ti.max(1.0 - rc * rc, 1e-30))
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


@ti.func
def _pulse_adjoint_at(iq_i: ti.template(), iq_q: ti.template(), tpi, tpq, K: ti.template(),
                      cplx: ti.template(), r, s, edge: ti.template()):
    """Adjoint (grf, grfq) of the RF of sample s of line r from iq.grad: the transpose axial
    pulse (image._axial_iq_bwd); edge (static): samples outside the line contribute zero."""
    grf, grfq = 0.0, 0.0
    for k in ti.static(range(-K, K + 1)):
        j = s + k
        gi, gq = 0.0, 0.0
        if ti.static(edge):
            jc = ti.min(ti.max(j, 0), iq_i.shape[1] - 1)
            gi = ti.select(j == jc, iq_i.grad[r, jc], 0.0)
            gq = ti.select(j == jc, iq_q.grad[r, jc], 0.0)
        else:
            gi, gq = iq_i.grad[r, j], iq_q.grad[r, j]
        grf += tpi[k + K] * gi + tpq[k + K] * gq
        if ti.static(cplx):
            grfq += -tpq[k + K] * gi + tpi[k + K] * gq
    return grf, grfq


@ti.func
def _pulse_adjoint_line(iq_i: ti.template(), iq_q: ti.template(), tpi, tpq, K: ti.template(),
                        cplx: ti.template(), r, grf: ti.template(), grfq: ti.template()):
    """(grf, grfq)[r, s] = :func:`_pulse_adjoint_at` of every sample s of line r: the inner
    samples in a loop that vectorises, then the K at each end (as fused.pulse_line)."""
    S = iq_i.shape[1]
    for s in range(K, S - K):
        grf[r, s], grfq[r, s] = _pulse_adjoint_at(iq_i, iq_q, tpi, tpq, K, cplx, r, s, False)
    for e in range(ti.min(2 * K, S)):          # samples 0 .. K - 1 and S - K .. S - 1
        s = e if e < K else S - 2 * K + e
        grf[r, s], grfq[r, s] = _pulse_adjoint_at(iq_i, iq_q, tpi, tpq, K, cplx, r, s, True)


@ti.kernel
def _echo_iq_bwd(z: ti.template(), alpha: ti.template(), scat: ti.template(),
                 scat_q: ti.template(), cosw: ti.template(), np_step: float,
                 taps_i: ti.template(), taps_q: ti.template(), K: ti.template(),
                 mode: ti.template(), gain: ti.template(), iq_i: ti.template(),
                 iq_q: ti.template(), pad: ti.template(), rf_i: ti.template(),
                 rf_q: ti.template(), acc: ti.template()):
    """rf_i, rf_q, acc (rays, samples; CPU): scratch of :func:`_echo_iq_bwd_split` (None: the
    serial sweep)."""
    if ti.static(_given(acc)):
        _echo_iq_bwd_split(z, alpha, scat, scat_q, cosw, np_step, taps_i, taps_q, K, mode,
                           gain, iq_i, iq_q, pad, rf_i, rf_q, acc)
    else:
        _echo_iq_bwd_serial(z, alpha, scat, scat_q, cosw, np_step, taps_i, taps_q, K, mode,
                            gain, iq_i, iq_q, pad)


@ti.func
def _interface_adjoint(z: ti.template(), cosw: ti.template(), gain: ti.template(),
                       grf: ti.template(), gcum: ti.template(), r, s):
    """Adjoints that the echo of interface s (samples s, s + 1) sends to z[s + 1], z[s],
    cosw[s], cosw[s + 1] (the terms pz, pc of :func:`_echo_iq_bwd_serial`), from the RF adjoint
    grf[r, s] and the adjoint gcum[r, s] of the log transmission of step s."""
    g = gain[r, s]
    gf = grf[r, s]
    z0, z1 = z[r, s], z[r, s + 1]
    den = z1 + z0 + 2.0 * Z_REF
    rc = (z1 - z0) / den
    iden = 1.0 / den
    c0, c1 = cosw[r, s], cosw[r, s + 1]
    w = ti.max(c0, c1)
    grc = gf * w * g
    gw = gf * rc * g
    q = 1.0 - rc * rc
    grc += ti.select(q > 1e-30, gcum[r, s] / q * (-2.0 * rc), 0.0)
    up = c0 > c1
    return (grc * (1.0 - rc) * iden, -grc * (1.0 + rc) * iden, ti.select(up, gw, 0.0),
            ti.select(up, 0.0, gw))


@ti.func
def _gain_adjoint(z: ti.template(), scat: ti.template(), scat_q: ti.template(),
                  cosw: ti.template(), mode: ti.template(), gain: ti.template(),
                  grf: ti.template(), grfq: ti.template(), acc: ti.template(), r, s,
                  last: ti.template()):
    """Sample s of :func:`_echo_iq_bwd_serial`'s sweep without its carried terms: scat.grad,
    scat_q.grad, and acc[r, s] = (adjoint of gain[r, s]) x gain[r, s] (last, static: the last
    sample, no interface after it)."""
    g = gain[r, s]
    gf = grf[r, s]
    gg = 0.0                                     # adjoint of gain[r, s]
    if ti.static(mode == 0):
        gq = grfq[r, s]
        gg = gf * scat[r, s] + gq * scat_q[r, s]
        scat.grad[r, s] = scat.grad[r, s] + gf * g
        scat_q.grad[r, s] = scat_q.grad[r, s] + gq * g
    if ti.static(mode == 1):
        gg = gain.grad[r, s]
    if ti.static(not last):
        gg += gf * ti.max(cosw[r, s], cosw[r, s + 1]) * refl(z[r, s], z[r, s + 1])
    acc[r, s] = gg * g


@ti.func
def _echo_iq_bwd_split(z: ti.template(), alpha: ti.template(), scat: ti.template(),
                       scat_q: ti.template(), cosw: ti.template(), np_step: ti.template(),
                       taps_i: ti.template(), taps_q: ti.template(), K: ti.template(),
                       mode: ti.template(), gain: ti.template(), iq_i: ti.template(),
                       iq_q: ti.template(), pad: ti.template(), grf: ti.template(),
                       grfq: ti.template(), acc: ti.template()):
    """CPU form of :func:`_echo_iq_bwd_serial` (same terms, same sums): per ray, loops over the
    samples without loop-carried state (LLVM vectorises them) but one, which sums one value per
    sample:

    1. the RF adjoints (grf, grfq) by the transpose axial pulse;
    2. scat.grad, scat_q.grad and each sample's term of the gain adjoint times its gain, into
       acc;
    3. (serial) acc <- the exclusive sum from the far end (the adjoint of the log transmission
       of each step);
    4. z.grad, cosw.grad of sample j from interfaces j - 1 and j (each computed twice rather
       than stored: :func:`_interface_adjoint`), alpha.grad."""
    for rr in range(z.shape[0] * pad):
        if rr % pad != 0:
            continue
        r = rr // pad
        S = z.shape[1]
        tpi, tpq = tap_registers(taps_i, taps_q, K)
        _pulse_adjoint_line(iq_i, iq_q, tpi, tpq, K, ti.static(mode == 0), r, grf, grfq)
        for s in range(S - 1):
            _gain_adjoint(z, scat, scat_q, cosw, mode, gain, grf, grfq, acc, r, s, False)
        _gain_adjoint(z, scat, scat_q, cosw, mode, gain, grf, grfq, acc, r, S - 1, True)
        gcum = 0.0
        for kk in range(S):
            s = S - 1 - kk
            t = acc[r, s]
            acc[r, s] = gcum
            gcum += t
        for j in range(1, S - 1):
            a_prev, _b, _c, d_prev = _interface_adjoint(z, cosw, gain, grf, acc, r, j - 1)
            _a, b, c, _d = _interface_adjoint(z, cosw, gain, grf, acc, r, j)
            z.grad[r, j] = z.grad[r, j] + b + a_prev
            cosw.grad[r, j] = cosw.grad[r, j] + c + d_prev
            alpha.grad[r, j] = alpha.grad[r, j] - 2.0 * np_step * acc[r, j]
        if S >= 2:
            _a, b, c, _d = _interface_adjoint(z, cosw, gain, grf, acc, r, 0)
            z.grad[r, 0] = z.grad[r, 0] + b
            cosw.grad[r, 0] = cosw.grad[r, 0] + c
            a_prev, _b, _c, d_prev = _interface_adjoint(z, cosw, gain, grf, acc, r, S - 2)
            z.grad[r, S - 1] = z.grad[r, S - 1] + 0.0 + a_prev
            cosw.grad[r, S - 1] = cosw.grad[r, S - 1] + 0.0 + d_prev
        alpha.grad[r, 0] = alpha.grad[r, 0] - 2.0 * np_step * acc[r, 0]
        if S >= 2:
            alpha.grad[r, S - 1] = alpha.grad[r, S - 1] - 2.0 * np_step * acc[r, S - 1]


@ti.func
def _echo_iq_bwd_serial(z: ti.template(), alpha: ti.template(), scat: ti.template(),
                        scat_q: ti.template(), cosw: ti.template(), np_step: ti.template(),
                        taps_i: ti.template(), taps_q: ti.template(), K: ti.template(),
                        mode: ti.template(), gain: ti.template(), iq_i: ti.template(),
                        iq_q: ti.template(), pad: ti.template()):
    """Adjoint of :func:`_echo_iq_fwd` as one reverse sweep per ray (GPU backends)."""
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
            grf, grfq = _pulse_adjoint_at(iq_i, iq_q, tpi, tpq, K, ti.static(mode == 0), r, s,
                                          True)    # transpose axial pulse (image._axial_iq_bwd)
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
            pad=1, rf_i=None, rf_q=None, acc=None):
    """Primary echo model + complex RF + axial pulse: gain[r, s] = exp(sum_{j<s} logt[r, j])
    (logt as echo.step_terms), rf = w r gain (+ gain scat, rf_q = gain scat_q for mode 0),
    iq = sum_k taps[k] (rf + i rf_q)[s - k]. Fields (rays, samples); np_step: nepers per
    (dB/cm/MHz) over one sample step; taps (2K+1,); mode (static) 0 coherent, 1 'mean', 2 'off'
    (scat, scat_q not read, rf_q = 0); pad: ray loop stride (backend.ray_loop_pad).
    rf_i, rf_q, acc (rays, samples, no gradient; CPU): scratch of the loops over samples that
    vectorise (None: one serial loop per ray, as on GPU backends)."""
    fast_call(_echo_iq_fwd, z, alpha, scat, scat_q, cosw, float(np_step), taps_i, taps_q, K,
              mode, gain, iq_i, iq_q, pad, rf_i, rf_q)


@ti.ad.grad_for(echo_iq)
def _echo_iq_grad(z, alpha, scat, scat_q, cosw, np_step, taps_i, taps_q, K, mode, gain, iq_i,
                  iq_q, pad=1, rf_i=None, rf_q=None, acc=None):
    fast_call(_echo_iq_bwd, z, alpha, scat, scat_q, cosw, float(np_step), taps_i, taps_q, K,
              mode, gain, iq_i, iq_q, pad, rf_i, rf_q, acc)


@ti.kernel
def _lel_fwd(iq_i: ti.template(), iq_q: ti.template(), lat_w: ti.template(),
             lat_mask: ti.template(), M: ti.template(), n_lines: ti.template(),
             mean: ti.template(), gain: ti.template(), strength: ti.template(),
             c: ti.template(), gain_db: float, tgc: float, dr: float, li: ti.template(),
             lq: ti.template(), gli: ti.template(), glq: ti.template(), bmode: ti.template(),
             pad: ti.template()):
    if ti.static(pad == 0):
        for r, s in bmode:
            li[r, s], lq[r, s] = lateral_at(iq_i, iq_q, lat_w, M, n_lines, r, s)
        for r, s in bmode:             # (a separate loop: ~25 % faster on CPU)
            d, cs = (gain[r, s] * strength[r, s], c[s]) if ti.static(mean) else (0.0, 0.0)
            bmode[r, s] = bmode_value(li[r, s], lq[r, s], s, mean, d, cs, gain_db, tgc, dr)
    else:                              # CPU: per line, vectorised across samples
        lateral_lines(iq_i, iq_q, lat_w, lat_mask, M, n_lines, mean, gain, strength, c,
                      gain_db, tgc, dr, bmode, li, lq, pad)


@ti.func
def _lel_sample_adjoint(iq_i: ti.template(), iq_q: ti.template(), mean: ti.template(),
                        gain: ti.template(), strength: ti.template(), c: ti.template(), dr,
                        li: ti.template(), lq: ti.template(), gli: ti.template(),
                        glq: ti.template(), bmode: ti.template(), r, s, one):
    """Adjoint of log_compress, (add_incoherent) and envelope at sample (r, s): into gli, glq
    (and gain.grad, strength.grad for ``mean``). one: 1.0 (a field value on CPU: the read
    before the loop over samples that lets it vectorise, see fused.lateral_line)."""
    b = bmode[r, s]
    gy = 0.0
    if 0.0 < b < 1.0:                  # unclipped (min/max pass the adjoint only strictly)
        gy = bmode.grad[r, s] * one
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


@ti.func
def _lateral_transpose_line(gl_i: ti.template(), gl_q: ti.template(), lat_w: ti.template(),
                            lat_mask: ti.template(), M: ti.template(), n_lines: ti.template(), j,
                            iq_i: ti.template(), iq_q: ti.template()):
    """iq.grad[j, s] += lateral_at_transpose of every sample s of line j: the terms
    mk[u] lat_w[2M - u, s] gl[j - M + u, s] (u = M - m, in lateral_at_transpose's order; mk =
    lat_mask[j % n_lines, u], rows clamped to the field: the rows past it have weight 0) added
    into iq.grad one window line at a time, a loop over the samples each (as
    fused.lateral_line: faster than one loop over all 2M+1 rows).
    The same sums as lateral_at_transpose's where iq.grad was zero before (the Tape clears it)."""
    for v in range(2 * M + 1):                 # v = 2M - u: lat_w's row
        u = 2 * M - v
        row = ti.min(ti.max(j - M + u, 0), gl_i.shape[0] - 1)
        mk = lat_mask[j % n_lines, u]
        for s in range(gl_i.shape[1]):
            w = mk * lat_w[v, s]
            iq_i.grad[j, s] = iq_i.grad[j, s] + w * gl_i[row, s]
            iq_q.grad[j, s] = iq_q.grad[j, s] + w * gl_q[row, s]


@ti.kernel
def _lel_bwd(iq_i: ti.template(), iq_q: ti.template(), lat_w: ti.template(),
             lat_mask: ti.template(), M: ti.template(), n_lines: ti.template(),
             mean: ti.template(), gain: ti.template(), strength: ti.template(),
             c: ti.template(), gain_db: float, tgc: float, dr: float, li: ti.template(),
             lq: ti.template(), gli: ti.template(), glq: ti.template(), bmode: ti.template(),
             pad: ti.template()):
    if ti.static(pad == 0):
        for r, s in bmode:             # adjoint of log_compress, (add_incoherent), envelope
            _lel_sample_adjoint(iq_i, iq_q, mean, gain, strength, c, dr, li, lq, gli, glq,
                                bmode, r, s, 1.0)
        for j, s in bmode:             # transpose lateral stencil (image._lateral_sum_bwd)
            gi, gq = lateral_at_transpose(gli, glq, lat_w, M, n_lines, j, s)
            iq_i.grad[j, s] = iq_i.grad[j, s] + gi
            iq_q.grad[j, s] = iq_q.grad[j, s] + gq
    else:                              # CPU: per line, vectorised across samples
        for rr in range(bmode.shape[0] * pad):
            if rr % pad != 0:
                continue
            r = rr // pad
            one = lat_mask[r % n_lines, M]    # 1.0: the line itself
            for s in range(bmode.shape[1]):
                _lel_sample_adjoint(iq_i, iq_q, mean, gain, strength, c, dr, li, lq, gli, glq,
                                    bmode, r, s, one)
        for jj in range(bmode.shape[0] * pad):
            if jj % pad != 0:
                continue
            j = jj // pad
            _lateral_transpose_line(gli, glq, lat_w, lat_mask, M, n_lines, j, iq_i, iq_q)


@ti.ad.grad_replaced
def lateral_envelope_log(iq_i, iq_q, lat_w, lat_mask, M, n_lines, mean, gain, strength, c,
                         gain_db, tgc, dr, li, lq, gli, glq, bmode, pad=0):
    """B-mode lines bmode (rays, samples) in [0, 1] from the axial I/Q: lateral sum with
    lat_w[m, s] over the n_lines (static) lines of each frame (kept in li, lq), envelope, with
    ``mean`` (static) sqrt(env^2 + c[s] (gain strength)^2), then
    clip((20 log10 env + gain_db + tgc s + dr) / dr, 0, 1) (dB, dB per sample).
    gli, glq (rays, samples): adjoint scratch (no gradient)."""
    fast_call(_lel_fwd, iq_i, iq_q, lat_w, lat_mask, M, int(n_lines), mean, gain, strength, c,
              float(gain_db), float(tgc), float(dr), li, lq, gli, glq, bmode, pad)


@ti.ad.grad_for(lateral_envelope_log)
def _lateral_envelope_log_grad(iq_i, iq_q, lat_w, lat_mask, M, n_lines, mean, gain, strength, c,
                               gain_db, tgc, dr, li, lq, gli, glq, bmode, pad=0):
    fast_call(_lel_bwd, iq_i, iq_q, lat_w, lat_mask, M, int(n_lines), mean, gain, strength, c,
              float(gain_db), float(tgc), float(dr), li, lq, gli, glq, bmode, pad)
