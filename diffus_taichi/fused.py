"""Fused forward-only render path (no gradients) for the ``primary`` echo model.

The staged, differentiable path runs one kernel per stage and keeps every stage in its own field
(march.march -> echo.step_terms -> exclusive_cumsum -> primary_combine -> image.form_rf ->
axial_iq -> lateral_sum -> envelope -> log_compress), as the Tape needs. Rendering without a
gradient needs none of those intermediates, so here

1. :func:`march_echo_iq` (one task per ray) makes each ray from the pose (as rays.make_rays and
   march.elevation_axes, which are then not launched; the poses come as a NumPy argument, so
   no upload kernel runs per frame either), computes the coherent scatterer sums of all its
   samples in a loop that LLVM vectorises across samples (no loop-carried state), then samples
   the acoustic-property volume (a voxel's trilinear polynomial is made once, when the ray
   enters it, not per sample), runs the primary echo recursion, forms the complex RF and
   applies the axial Gabor pulse, writing only the axial I/Q (rays, samples). On CPU
   (:func:`march_passes`) only the voxel sampling and the product of the transmissions are
   serial loops; incidence angle, reflection, attenuation and the pulse are loops over the
   samples that vectorise. On GPU backends (:func:`march_serial`) it is one serial loop per
   ray (one thread each), the RF through a (2K+1)-sample shift register;
2. :func:`bmode_fan` sums the lateral beam across lines of the same frame, takes the envelope
   (plus the expected diffuse intensity for ``speckle='mean'``), log-compresses it to the
   B-mode lines (rays, samples) in [0, 1] (per sample on GPU backends; per line, vectorised
   across samples with vecmath.log_f32, on CPU) and scan-converts them to the fan (a second
   loop of the same kernel: one kernel fewer to prepare at start-up and to launch per frame),
   optionally also into a NumPy array (``render()``: no separate copy kernel).

A loop over samples vectorises only if (Taichi 1.7 CPU, found by reading the generated
assembly): it calls no libm function (hence vecmath's exp/log), gathers nothing (LLVM's cost
model for this CPU rejects gathers), reads a field before it in the same task (else the root
buffer's address is reloaded after every store), and the scalars it reads are kernel arguments
or its own locals, not a ti.func's value parameters (those become global temporaries when the
loop is the kernel's parallel loop). Also, a loop over samples should read few rows at once: the
lateral sum's 2M+1 = 9 rows (2 KB apart) in one loop ran slower than one pass per row, and its
weights stored (samples, 2M+1) were loaded lane by lane (now (2M+1, samples): contiguous).

The terms are the staged path's (same order), so on the same rays the two agree to the last few
f32 ulps (``tests/test_batch_fused.py``; the rays themselves agree to an ulp: LLVM may contract
the two kernels' expressions differently). Rays of a batch of B frames are stacked: ray r
belongs to frame r // n_lines.
"""

import taichi as ti

from .image import DB_PER_NEPER, lateral_at
from .march import (cached_coeffs, cell_phasors, elevation_axis, eval_coeffs, incidence_cos,
                    no_cached_voxel, ray_scatterer_sums, speckle_sample)
from .rays import mat3_vec, pose_transform, voxel_affine
from .echo import refl
from .scan import scan_fan
from .vecmath import exp_real, log_real

SPECKLE_MODES = {"coherent": 0, "mean": 1, "off": 2}


@ti.func
def shift_in(buf, v, K: ti.template()):
    """Shift register of 2K+1 values: drop buf[0], append v."""
    return ti.Vector([buf[m + 1] for m in ti.static(range(2 * K))] + [v])


@ti.func
def tap_registers(taps_i: ti.template(), taps_q: ti.template(), K: ti.template()):
    """The 2K+1 axial taps as registers (loaded once per ray)."""
    tpi = ti.Vector([0.0] * (2 * K + 1))
    tpq = ti.Vector([0.0] * (2 * K + 1))
    for k in ti.static(range(2 * K + 1)):
        tpi[k] = taps_i[k]
        tpq[k] = taps_q[k]
    return tpi, tpq


@ti.func
def pulse(bi, bq, tpi, tpq, K: ti.template(), cplx: ti.template()):
    """Axial complex pulse at the centre of the register (bi, bq) = rf[s0 - K .. s0 + K]:
    sum_k taps[k] (rf + i rf_q)[s0 - k] (taps from :func:`tap_registers`), as image._axial_iq."""
    ai, aq = 0.0, 0.0
    for k in ti.static(range(-K, K + 1)):
        m = ti.static(K - k)
        ai += tpi[k + K] * bi[m]
        aq += tpq[k + K] * bi[m]
        if ti.static(cplx):
            ai -= tpq[k + K] * bq[m]
            aq += tpi[k + K] * bq[m]
    return ai, aq


@ti.func
def pulse_at(rf_i: ti.template(), rf_q: ti.template(), tpi, tpq, K: ti.template(),
             cplx: ti.template(), r, s0, edge: ti.template()):
    """:func:`pulse` of sample s0 of line r from the RF rows rf_i, rf_q (rays, samples) (the same
    sums in the same order); edge (static): RF samples outside the line are zero."""
    ai, aq = 0.0, 0.0
    for k in ti.static(range(-K, K + 1)):
        j = s0 - k
        vi, vq = 0.0, 0.0
        if ti.static(edge):
            jc = ti.min(ti.max(j, 0), rf_i.shape[1] - 1)
            vi = ti.select(j == jc, rf_i[r, jc], 0.0)
            if ti.static(cplx):
                vq = ti.select(j == jc, rf_q[r, jc], 0.0)
        else:
            vi = rf_i[r, j]
            if ti.static(cplx):
                vq = rf_q[r, j]
        ai += tpi[k + K] * vi
        aq += tpq[k + K] * vi
        if ti.static(cplx):
            ai -= tpq[k + K] * vq
            aq += tpi[k + K] * vq
    return ai, aq


@ti.func
def pulse_line(rf_i: ti.template(), rf_q: ti.template(), tpi, tpq, K: ti.template(),
               cplx: ti.template(), r, iq_i: ti.template(), iq_q: ti.template()):
    """iq[r, s0] = :func:`pulse_at` for every sample s0 of line r: the inner samples in a loop
    without loop-carried state (LLVM vectorises it), then the K at each end (lines of at least
    2K samples)."""
    S = iq_i.shape[1]
    for s0 in range(K, S - K):
        iq_i[r, s0], iq_q[r, s0] = pulse_at(rf_i, rf_q, tpi, tpq, K, cplx, r, s0, False)
    for e in range(ti.min(2 * K, S)):          # samples 0 .. K - 1 and S - K .. S - 1
        s0 = e if e < K else S - 2 * K + e
        iq_i[r, s0], iq_q[r, s0] = pulse_at(rf_i, rf_q, tpi, tpq, K, cplx, r, s0, True)


@ti.kernel
def march_echo_iq(pose_src: ti.types.ndarray(ndim=2), seed_src: ti.types.ndarray(ndim=1),
                  pose: ti.template(), seeds: ti.template(),
                  line_o: ti.template(), line_d: ti.template(),
                  w2v: ti.template(), props: ti.template(), outside: ti.template(),
                  vo: ti.template(), vd: ti.template(), ro: ti.template(), rd: ti.template(),
                  ey: ti.template(), eyv: ti.template(), gradT: ti.template(), step_mm: float,
                  inv_cell_mm: float, k2h: float, elev_off: ti.template(),
                  elev_w: ti.template(), n_elev: ti.template(), mode: ti.template(),
                  np_per_dbcm_step: float, taps_i: ti.template(), taps_q: ti.template(),
                  K: ti.template(), iq_i: ti.template(), iq_q: ti.template(),
                  incoh: ti.template(), pad: ti.template(), rf_i: ti.template(),
                  rf_q: ti.template(), t_s: ti.template(), split: ti.template()):
    """Axial I/Q (rays, samples) of the primary model for the pose(s) pose_src (B, 6) [t mm,
    rotvec rad] and scatterer seeds seed_src (B,) i32: NumPy arguments, which this kernel also
    copies into the fields pose and seeds (as rays.set_poses, which then need not run per
    frame). Each ray is made here as in rays.make_rays (line l of frame b = r // n_lines; also
    written to ro, rd, vo, vd and, for coherent speckle, its elevation axis to ey, eyv as
    march.elevation_axes), then marched as march.march. mode (static): 0 coherent scatterers,
    1 'mean' (writes incoh = two-way gain x scattering strength for the expected diffuse
    intensity), 2 'off'.
    np_per_dbcm_step: nepers per (dB/cm/MHz) over one sample step. pad (static): ray
    r = index // pad, only every pad-th index works (backend.ray_loop_pad: spreads few rays
    over every CPU thread). split (static; CPU): :func:`march_passes` with the scratch rows
    (rays, samples) rf_i, rf_q (rf_q may be incoh) and t_s, instead of one serial loop per
    ray."""
    for rr in range(iq_i.shape[0] * pad):
        if rr % pad != 0:
            continue
        r = rr // pad
        L = line_o.shape[0]
        b, l = r // L, r % L
        Rp, tp = pose_transform(pose_src, b)
        if l == 0:
            for k in ti.static(range(6)):
                pose[b, k] = pose_src[b, k]
            seeds[b] = seed_src[b]
        M, c = voxel_affine(w2v[None])
        o = mat3_vec(Rp, line_o[l]) + tp             # as rays.make_rays (f32: to ~1 ulp, as
        d = mat3_vec(Rp, line_d[l])                  # LLVM may contract differently)
        pv0, pvd = mat3_vec(M, o) + c, mat3_vec(M, d)
        ro[r], rd[r], vo[r], vd[r] = o, d, pv0, pvd
        if ti.static(mode == 0):                     # elevation axis: lateral vector from the
            l1, l2 = ti.max(l - 1, 0), ti.min(l + 1, L - 1)     # neighbour lines, rotated
            ax = elevation_axis(d, mat3_vec(Rp, (line_o[l2] - line_o[l1])
                                            + (line_d[l2] - line_d[l1])))
            ey[r], eyv[r] = ax, mat3_vec(M, ax)
        S = iq_i.shape[1]
        P = cell_phasors(d, k2h)
        seed = seed_src[b]
        if ti.static(mode == 0 and n_elev == 1):
            # the scatterer sums of all samples first, in a loop without loop-carried state
            # (LLVM vectorises it across samples), parked in iq_i/iq_q[r, s]: the loops below
            # read slot s before they write anything there
            ray_scatterer_sums(P, o, d, ey[r], step_mm, elev_off, inv_cell_mm, k2h, seed, r,
                               iq_i, iq_q)
        if ti.static(split):
            march_passes(props, outside, P, pv0, pvd, o, d, gradT, step_mm, inv_cell_mm, k2h,
                         seed, elev_off, elev_w, n_elev, mode, np_per_dbcm_step, taps_i, taps_q,
                         K, r, rd, ey, eyv, iq_i, iq_q, incoh, rf_i, rf_q, t_s)
        else:
            march_serial(props, outside, P, pv0, pvd, o, d, gradT, step_mm, inv_cell_mm, k2h,
                         seed, elev_off, elev_w, n_elev, mode, np_per_dbcm_step, taps_i, taps_q,
                         K, r, rd, ey, eyv, iq_i, iq_q, incoh)


@ti.func
def march_serial(props: ti.template(), outside: ti.template(), P, pv0, pvd, o, d,
                 gradT: ti.template(), step_mm, inv_cell_mm, k2h, seed, elev_off: ti.template(),
                 elev_w: ti.template(), n_elev: ti.template(), mode: ti.template(),
                 np_per_dbcm_step, taps_i: ti.template(), taps_q: ti.template(),
                 K: ti.template(), r, rd: ti.template(), ey: ti.template(), eyv: ti.template(),
                 iq_i: ti.template(), iq_q: ti.template(), incoh: ti.template()):
    """Ray r of :func:`march_echo_iq` in one serial loop over its samples (GPU backends: one
    thread per ray): sample the property volume (the trilinear polynomial of a voxel made once,
    when the ray enters it: march.cached_coeffs), the primary echo recursion (round-trip transmission g in a register), the
    complex RF and the axial pulse through a (2K+1)-sample shift register; writes iq (the
    register lags K + 1 samples, so slot s is read before the I/Q of sample s - 1 - K goes
    there)."""
    S = iq_i.shape[1]
    ci, k0, k1, k2, k3, k4, k5, k6, k7 = no_cached_voxel()   # voxel cache (polynomial)
    zero = ti.Vector([0.0, 0.0, 0.0])
    z_p, a_p, cos_p, si_p, sq_p, st_p = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0   # previous sample
    g = 1.0                                      # two-way transmission down to it
    tpi, tpq = tap_registers(taps_i, taps_q, K)
    bi = ti.Vector([0.0] * (2 * K + 1))        # RF shift register (I, Q)
    bq = ti.Vector([0.0] * (2 * K + 1))
    for s in range(S + 1 + K):
        if s <= S:
            rf, rfq = 0.0, 0.0
            cw, si, sq = 0.0, 0.0, 0.0
            prop = zero
            if s < S:
                d_mm = s * step_mm
                pv = pv0 + d_mm * pvd
                ci, fr, k0, k1, k2, k3, k4, k5, k6, k7 = cached_coeffs(
                    props, outside[None], pv, ci, k0, k1, k2, k3, k4, k5, k6, k7)
                prop, gidx = eval_coeffs(k0, k1, k2, k3, k4, k5, k6, k7, fr[0], fr[1], fr[2])
                cw = incidence_cos(mat3_vec(gradT[None], gidx), d)
                si, sq = _sample_speckle(props, outside, P, prop, pv, o, d, d_mm, r, s, rd, ey,
                                         eyv, inv_cell_mm, k2h, seed, elev_off, elev_w, n_elev,
                                         mode, iq_i, iq_q)
            if s > 0:                            # sample s - 1 is complete: its RF
                e = 0.0
                g_next = g
                if s < S:
                    rc = refl(z_p, prop[0])
                    e = ti.max(cos_p, cw) * rc * g
                    g_next = (g * ti.max(1.0 - rc * rc, 1e-30)
                              * exp_real(-2.0 * (a_p * np_per_dbcm_step)))
                rf = e
                if ti.static(mode == 0):
                    rf = e + g * si_p
                    rfq = g * sq_p
                if ti.static(mode == 1):
                    incoh[r, s - 1] = g * st_p
                bi = shift_in(bi, rf, K)
                bq = shift_in(bq, rfq, K)
                g = g_next
            z_p, a_p, cos_p, si_p, sq_p, st_p = prop[0], prop[1], cw, si, sq, prop[2]
        else:                                    # past the line: zeros flush the register
            bi = shift_in(bi, 0.0, K)
            bq = shift_in(bq, 0.0, K)
        s0 = s - 1 - K                           # register holds rf[s0 - K .. s0 + K]
        if s0 >= 0:
            iq_i[r, s0], iq_q[r, s0] = pulse(bi, bq, tpi, tpq, K, ti.static(mode == 0))


@ti.func
def _sample_speckle(props: ti.template(), outside: ti.template(), P, prop, pv, o, d, d_mm, r, s,
                    rd: ti.template(), ey: ti.template(), eyv: ti.template(), inv_cell_mm, k2h,
                    seed, elev_off: ti.template(), elev_w: ti.template(), n_elev: ti.template(),
                    mode: ti.template(), iq_i: ti.template(), iq_q: ti.template()):
    """Coherent scatterer signal (I, Q) of sample s as march.speckle_sample (one elevation
    plane: from the sums parked in iq_i/iq_q[r, s]); (0, 0) unless mode 0."""
    si, sq = 0.0, 0.0
    if ti.static(mode == 0 and n_elev == 1):
        si += elev_w[s, 0] * prop[2] * iq_i[r, s]
        sq += elev_w[s, 0] * prop[2] * iq_q[r, s]
    elif ti.static(mode == 0):
        si, sq = speckle_sample(props, outside, P, prop[2], pv, o + d_mm * d, r, s, rd, ey,
                                eyv, inv_cell_mm, k2h, seed, elev_off, elev_w, n_elev, P, None,
                                False)
    return si, sq


@ti.func
def march_passes(props: ti.template(), outside: ti.template(), P, pv0, pvd, o, d,
                 gradT: ti.template(), step_mm, inv_cell_mm, k2h, seed, elev_off: ti.template(),
                 elev_w: ti.template(), n_elev: ti.template(), mode: ti.template(),
                 np_per_dbcm_step, taps_i: ti.template(), taps_q: ti.template(),
                 K: ti.template(), r, rd: ti.template(), ey: ti.template(), eyv: ti.template(),
                 iq_i: ti.template(), iq_q: ti.template(), incoh: ti.template(),
                 rf_i: ti.template(), rf_q: ti.template(), t_s: ti.template()):
    """Ray r of :func:`march_echo_iq` (CPU) as :func:`march_serial`'s terms in loops over its
    samples of which only the voxel-cache sampling and a product are serial (in one loop they
    left too few registers, and the exp and incidence angle alone cost ~0.9 ms a frame):

    1. (serial, voxel cache of trilinear polynomials: march.cached_coeffs) sample s -> z in
       rf_i, the index-space gradient of z in (rf_q, t_s[1], t_s[2]), attenuation in t_s[0];
       mode 0: the scatterer signal (I, Q) in iq_i, iq_q; mode 1: the strength in iq_q;
    2. (vectorised) |cos incidence| into rf_q;
    3. (vectorised) echo of the step s -> s + 1 (+ the scatterer signal) into iq_i, its
       round-trip transmission into t_s[0];
    4. (serial, one product per sample) two-way gain g: RF = g iq into rf_i, rf_q (mode 0)
       or g strength into incoh (mode 1; rf_q may be incoh);
    5. (vectorised) axial pulse: :func:`pulse_line`.
    t_s: a 3-vector field (rays, samples), SOA layout (so that the loops vectorise)."""
    S = iq_i.shape[1]
    ci, k0, k1, k2, k3, k4, k5, k6, k7 = no_cached_voxel()   # voxel cache (polynomial)
    for s in range(S):
        d_mm = s * step_mm
        pv = pv0 + d_mm * pvd
        ci, fr, k0, k1, k2, k3, k4, k5, k6, k7 = cached_coeffs(
            props, outside[None], pv, ci, k0, k1, k2, k3, k4, k5, k6, k7)
        prop, gidx = eval_coeffs(k0, k1, k2, k3, k4, k5, k6, k7, fr[0], fr[1], fr[2])
        rf_i[r, s] = prop[0]
        rf_q[r, s] = gidx[0]                 # the gradient: its incidence angle in loop 2
        t_s[r, s] = ti.Vector([prop[1], gidx[1], gidx[2]])
        if ti.static(mode == 0):
            iq_i[r, s], iq_q[r, s] = _sample_speckle(props, outside, P, prop, pv, o, d, d_mm,
                                                     r, s, rd, ey, eyv, inv_cell_mm, k2h, seed,
                                                     elev_off, elev_w, n_elev, mode, iq_i, iq_q)
        if ti.static(mode == 1):
            iq_q[r, s] = prop[2]
    G = gradT[None]
    for s in range(S):
        rf_q[r, s] = incidence_cos(mat3_vec(G, ti.Vector([rf_q[r, s], t_s[r, s][1],
                                                          t_s[r, s][2]])), d)
    for s in range(S - 1):
        rc = refl(rf_i[r, s], rf_i[r, s + 1])
        e = ti.max(rf_q[r, s], rf_q[r, s + 1]) * rc
        t_s[r, s][0] = (ti.max(1.0 - rc * rc, 1e-30)
                        * exp_real(-2.0 * (t_s[r, s][0] * np_per_dbcm_step)))
        if ti.static(mode == 0):
            iq_i[r, s] = e + iq_i[r, s]
        else:
            iq_i[r, s] = e
    if ti.static(mode != 0):
        iq_i[r, S - 1] = 0.0
    g = 1.0
    for s in range(S):
        rf_i[r, s] = g * iq_i[r, s]
        if ti.static(mode == 0):
            rf_q[r, s] = g * iq_q[r, s]
        if ti.static(mode == 1):
            incoh[r, s] = g * iq_q[r, s]
        g *= t_s[r, s][0]
    tpi, tpq = tap_registers(taps_i, taps_q, K)
    pulse_line(rf_i, rf_q, tpi, tpq, K, ti.static(mode == 0), r, iq_i, iq_q)


@ti.func
def bmode_value(ai, aq, s, mean: ti.template(), d, cs, gain_db, tgc_db_per_sample,
                dynamic_range_db):
    """B-mode value in [0, 1] of sample s from its laterally summed I/Q: envelope |I + iQ|
    (with ``mean``: sqrt(env^2 + cs d^2), d = two-way gain x scattering strength, cs = c[s]),
    then clip((20 log10 env + gain + TGC s + DR) / DR, 0, 1), as image.envelope ..
    log_compress."""
    env = ti.sqrt(ai * ai + aq * aq + 1e-24)
    if ti.static(mean):
        env = ti.sqrt(env * env + cs * d * d)
    db = DB_PER_NEPER * log_real(env) + gain_db + tgc_db_per_sample * s
    return ti.min(ti.max((db + dynamic_range_db) / dynamic_range_db, 0.0), 1.0)


@ti.kernel
def bmode_fan(iq_i: ti.template(), iq_q: ti.template(), lat_w: ti.template(),
              lat_mask: ti.template(), M: ti.template(),
              n_lines: ti.template(), mean: ti.template(), incoh: ti.template(), c: ti.template(),
              gain_db: float, tgc_db_per_sample: float, dynamic_range_db: float,
              bmode: ti.template(), pad: ti.template(), sc_base: ti.template(),
              sc_frac: ti.template(), fan: ti.template(), out: ti.types.ndarray(),
              with_out: ti.template(), lq: ti.template()):
    """:func:`lateral_envelope_log` into bmode, then scan.scan_fan into fan (and, with_out
    (static), into the ndarray out of fan's shape; else out is not touched). lq (CPU): scratch
    (rays, samples) of the lateral sums."""
    lateral_envelope_log(iq_i, iq_q, lat_w, lat_mask, M, n_lines, mean, incoh, c, gain_db,
                         tgc_db_per_sample, dynamic_range_db, bmode, pad, lq)
    scan_fan(bmode, sc_base, sc_frac, fan, out, with_out)


@ti.func
def lateral_envelope_log(iq_i: ti.template(), iq_q: ti.template(), lat_w: ti.template(),
                         lat_mask: ti.template(), M: ti.template(), n_lines: ti.template(),
                         mean: ti.template(), incoh: ti.template(), c: ti.template(),
                         gain_db: ti.template(), tgc_db_per_sample: ti.template(),
                         dynamic_range_db: ti.template(), bmode: ti.template(),
                         pad: ti.template(), lq: ti.template()):
    """B-mode lines (rays, samples) in [0, 1]: lateral beam sum over the lines of the same frame
    (weights lat_w[m, s], lines outside the frame count as zero), then :func:`bmode_value`; as
    image.lateral_sum .. log_compress. A parallel loop where inlined at kernel level.

    pad = 0 (GPU backends): one thread per (line, sample). pad >= 1 (CPU): :func:`lateral_lines`
    (the I sums accumulated in bmode itself, the Q sums in lq).
    The scalars are template parameters, so that the loops read the kernel's arguments: a
    ti.func's value parameter is a local of the kernel's serial part, which the parallel loop
    would read from Taichi's global temporaries (reloaded after every store: the loop over
    samples did not vectorise)."""
    if ti.static(pad == 0):
        for r, s in bmode:
            ai, aq = lateral_at(iq_i, iq_q, lat_w, M, n_lines, r, s)
            d, cs = (incoh[r, s], c[s]) if ti.static(mean) else (0.0, 0.0)
            bmode[r, s] = bmode_value(ai, aq, s, mean, d, cs, gain_db, tgc_db_per_sample,
                                      dynamic_range_db)
    else:
        lateral_lines(iq_i, iq_q, lat_w, lat_mask, M, n_lines, mean, incoh, None, c, gain_db,
                      tgc_db_per_sample, dynamic_range_db, bmode, bmode, lq, pad)


def _given(x) -> bool:
    """For ti.static: whether an optional template argument was given (Taichi scope has no
    ``is not``)."""
    return x is not None


@ti.func
def lateral_lines(iq_i: ti.template(), iq_q: ti.template(), lat_w: ti.template(),
                  lat_mask: ti.template(), M: ti.template(), n_lines: ti.template(),
                  mean: ti.template(), d_a: ti.template(), d_b: ti.template(),
                  c: ti.template(), gain_db: ti.template(), tgc_db_per_sample: ti.template(),
                  dynamic_range_db: ti.template(), bmode: ti.template(), li: ti.template(),
                  lq: ti.template(), pad: ti.template()):
    """CPU form of the lateral sum .. log compression: one task per line (only every pad-th loop
    index works, backend.ray_loop_pad) runs :func:`lateral_line`, loops over samples that LLVM
    vectorises. ``mean``: d = d_a[r, s] (x d_b[r, s] unless None). li, lq (rays, samples): where
    the lateral sums are accumulated (and kept; li may be bmode itself)."""
    for rr in range(bmode.shape[0] * pad):
        if rr % pad != 0:
            continue
        r = rr // pad
        lateral_line(iq_i, iq_q, lat_w, lat_mask, M, n_lines, r, mean, d_a, d_b, c, gain_db,
                     tgc_db_per_sample, dynamic_range_db, bmode, li, lq)


@ti.func
def lateral_line(iq_i: ti.template(), iq_q: ti.template(), lat_w: ti.template(),
                 lat_mask: ti.template(), M: ti.template(), n_lines: ti.template(), r,
                 mean: ti.template(), d_a: ti.template(), d_b: ti.template(),
                 c: ti.template(), gain_db, tgc_db_per_sample, dynamic_range_db,
                 bmode: ti.template(), li: ti.template(), lq: ti.template()):
    """bmode[r, s] of every sample s of line r: the lateral sum of mk lat_w[m, s] iq[r - M + m, s]
    over m (mk = lat_mask[r % n_lines, m]: 0 for lines outside the frame; the rows are clamped
    to the field) accumulated into li[r, s], lq[r, s] one window line at a time (a loop over the
    samples per window line; with all 2M+1 rows of 2 KB stride read in one loop, the lateral
    task took 0.39 instead of 0.29 ms a frame, likely beyond the L1 cache's associativity),
    then :func:`bmode_value` per sample."""
    for m in range(2 * M + 1):
        row = ti.min(ti.max(r - M + m, 0), bmode.shape[0] - 1)
        mk = lat_mask[r % n_lines, m]
        for s in range(bmode.shape[1]):
            w = mk * lat_w[m, s]
            li[r, s] = ti.select(m > 0, li[r, s], 0.0) + w * iq_i[row, s]
            lq[r, s] = ti.select(m > 0, lq[r, s], 0.0) + w * iq_q[row, s]
    one = lat_mask[r % n_lines, M]          # 1.0 (the line itself): the field read right
    for s in range(bmode.shape[1]):         # before the loop that lets it vectorise
        d, cs = 0.0, 0.0
        if ti.static(mean):
            d, cs = d_a[r, s], c[s]
            if ti.static(_given(d_b)):
                d = d_a[r, s] * d_b[r, s]
        bmode[r, s] = bmode_value(li[r, s] * one, lq[r, s], s, mean, d, cs, gain_db,
                                  tgc_db_per_sample, dynamic_range_db)
