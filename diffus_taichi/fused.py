"""Fused forward-only render path (no gradients) for the ``primary`` echo model.

The staged, differentiable path runs one kernel per stage and keeps every stage in its own field
(march.march -> echo.step_terms -> exclusive_cumsum -> primary_combine -> image.form_rf ->
axial_iq -> lateral_sum -> envelope -> log_compress), as the Tape needs. Rendering without a
gradient needs none of those intermediates, so here

1. :func:`march_echo_iq` (rays in parallel, samples serial) makes each ray from the pose (as
   rays.make_rays and march.elevation_axes, which are then not launched; the poses come as a
   NumPy argument, so no upload kernel runs per frame either), computes the coherent
   scatterer sums of all its samples in a first loop that LLVM vectorises across samples (no
   loop-carried state; 2x faster than inside the serial loop), then in a serial loop samples
   the acoustic-property volume (the 8 voxel corners are fetched once per voxel the ray
   enters, not once per sample), runs the primary echo recursion (round-trip transmission
   carried in a register), forms the complex RF and applies the axial Gabor pulse with a
   (2K+1)-sample shift register, writing only the axial I/Q (rays, samples);
2. :func:`bmode_fan` (per sample) sums the lateral beam across lines of the same frame, takes
   the envelope (plus the expected diffuse intensity for ``speckle='mean'``), log-compresses it
   to the B-mode lines (rays, samples) in [0, 1] and scan-converts them to the fan (a second
   loop of the same kernel: one kernel fewer to prepare at start-up and to launch per frame),
   optionally also into a NumPy array (``render()``: no separate copy kernel).

The arithmetic is the staged path's, term by term (same ti.funcs, same order), so on the same
rays the two agree to the last few f32 ulps (``tests/test_batch_fused.py``; the rays themselves
agree to an ulp: LLVM may contract the two kernels' expressions differently). Rays of a batch
of B frames are stacked: ray r belongs to frame r // n_lines.
"""

import taichi as ti

from .image import DB_PER_NEPER, lateral_at
from .march import (cached_corners, cell_phasors, elevation_axis, incidence_cos,
                    interp_corners, no_cached_corners, ray_scatterer_sums, speckle_sample)
from .rays import mat3_vec, pose_transform, voxel_affine
from .echo import refl
from .scan import scan_fan

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
                  incoh: ti.template(), pad: ti.template()):
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
    over every CPU thread)."""
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
        ci, c000, c100, c010, c110, c001, c101, c011, c111 = no_cached_corners()   # voxel cache
        zero = ti.Vector([0.0, 0.0, 0.0])
        z_p, a_p, cos_p, si_p, sq_p, st_p = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0   # previous sample
        g = 1.0                                      # two-way transmission down to it
        tpi, tpq = tap_registers(taps_i, taps_q, K)
        bi = ti.Vector([0.0] * (2 * K + 1))        # RF shift register (I, Q)
        bq = ti.Vector([0.0] * (2 * K + 1))
        if ti.static(mode == 0 and n_elev == 1):
            # the scatterer sums of all samples first, in a loop without loop-carried state
            # (LLVM vectorises it across samples), parked in iq_i/iq_q[r, s]: the serial loop
            # below reads slot s before it writes the I/Q of sample s - 1 - K there
            ray_scatterer_sums(P, o, d, ey[r], step_mm, elev_off, inv_cell_mm, k2h, seed, r,
                               iq_i, iq_q)
        for s in range(S + 1 + K):
            if s <= S:
                rf, rfq = 0.0, 0.0
                cw, si, sq = 0.0, 0.0, 0.0
                prop = zero
                if s < S:
                    d_mm = s * step_mm
                    pv = pv0 + d_mm * pvd
                    ci, fr, c000, c100, c010, c110, c001, c101, c011, c111 = cached_corners(
                        props, outside[None], pv, ci, c000, c100, c010, c110, c001, c101, c011,
                        c111)
                    prop, gidx = interp_corners(c000, c100, c010, c110, c001, c101, c011, c111,
                                                fr[0], fr[1], fr[2])
                    cw = incidence_cos(mat3_vec(gradT[None], gidx), d)
                    if ti.static(mode == 0 and n_elev == 1):   # as speckle_sample
                        si += elev_w[s, 0] * prop[2] * iq_i[r, s]
                        sq += elev_w[s, 0] * prop[2] * iq_q[r, s]
                    elif ti.static(mode == 0):
                        si, sq = speckle_sample(props, outside, P, prop[2], pv,
                                                o + d_mm * d, r, s, rd, ey, eyv,
                                                inv_cell_mm, k2h, seed, elev_off, elev_w, n_elev,
                                                P, None, False)
                if s > 0:                            # sample s - 1 is complete: its RF
                    e = 0.0
                    g_next = g
                    if s < S:
                        rc = refl(z_p, prop[0])
                        e = ti.max(cos_p, cw) * rc * g
                        g_next = g * ti.max(1.0 - rc * rc, 1e-30) * ti.exp(-2.0 * (a_p * np_per_dbcm_step))
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
def bmode_value(ai, aq, s, mean: ti.template(), d, cs, gain_db, tgc_db_per_sample,
                dynamic_range_db):
    """B-mode value in [0, 1] of sample s from its laterally summed I/Q: envelope |I + iQ|
    (with ``mean``: sqrt(env^2 + cs d^2), d = two-way gain x scattering strength, cs = c[s]),
    then clip((20 log10 env + gain + TGC s + DR) / DR, 0, 1), as image.envelope ..
    log_compress."""
    env = ti.sqrt(ai * ai + aq * aq + 1e-24)
    if ti.static(mean):
        env = ti.sqrt(env * env + cs * d * d)
    db = DB_PER_NEPER * ti.log(env) + gain_db + tgc_db_per_sample * s
    return ti.min(ti.max((db + dynamic_range_db) / dynamic_range_db, 0.0), 1.0)


@ti.kernel
def bmode_fan(iq_i: ti.template(), iq_q: ti.template(), lat_w: ti.template(), M: ti.template(),
              n_lines: ti.template(), mean: ti.template(), incoh: ti.template(), c: ti.template(),
              gain_db: float, tgc_db_per_sample: float, dynamic_range_db: float,
              bmode: ti.template(), pad: ti.template(), sc_base: ti.template(),
              sc_frac: ti.template(), fan: ti.template(), out: ti.types.ndarray(),
              with_out: ti.template()):
    """:func:`lateral_envelope_log` into bmode, then scan.scan_fan into fan (and, with_out
    (static), into the ndarray out of fan's shape; else out is not touched)."""
    lateral_envelope_log(iq_i, iq_q, lat_w, M, n_lines, mean, incoh, c, gain_db,
                         tgc_db_per_sample, dynamic_range_db, bmode, pad)
    scan_fan(bmode, sc_base, sc_frac, fan, out, with_out)


@ti.func
def lateral_envelope_log(iq_i: ti.template(), iq_q: ti.template(), lat_w: ti.template(),
                         M: ti.template(), n_lines: ti.template(), mean: ti.template(),
                         incoh: ti.template(), c: ti.template(), gain_db, tgc_db_per_sample,
                         dynamic_range_db, bmode: ti.template(), pad: ti.template()):
    """B-mode lines (rays, samples) in [0, 1]: lateral beam sum over the lines of the same frame
    (weights lat_w[s, m], lines outside the frame count as zero), then :func:`bmode_value`; as
    image.lateral_sum .. log_compress. A parallel loop where inlined at kernel level.

    pad = 0 (GPU backends): one thread per (line, sample). pad >= 1 (CPU): one task per (frame,
    sample) walks the frame's lines with a (2M+1)-line window of I/Q in registers (2 loads per
    output instead of 3 (2M+1)); only every pad-th loop index works (backend.ray_loop_pad)."""
    if ti.static(pad == 0):
        for r, s in bmode:
            ai, aq = lateral_at(iq_i, iq_q, lat_w, M, n_lines, r, s)
            d, cs = (incoh[r, s], c[s]) if ti.static(mean) else (0.0, 0.0)
            bmode[r, s] = bmode_value(ai, aq, s, mean, d, cs, gain_db, tgc_db_per_sample,
                                      dynamic_range_db)
    else:
        for ii in range(bmode.shape[0] // n_lines * bmode.shape[1] * pad):
            if ii % pad != 0:
                continue
            NS = bmode.shape[1]
            base, s = ii // pad // NS * n_lines, ii // pad % NS
            w = ti.Vector([lat_w[s, m] for m in ti.static(range(2 * M + 1))])
            bi = ti.Vector([0.0] * (2 * M + 1))      # I/Q of lines l - M .. l + M
            bq = ti.Vector([0.0] * (2 * M + 1))
            for k in ti.static(range(M)):               # lines 0 .. M - 1
                if k < n_lines:
                    bi = shift_in(bi, iq_i[base + k, s], M)
                    bq = shift_in(bq, iq_q[base + k, s], M)
            for l in range(n_lines):
                vi, vq = 0.0, 0.0
                if l + M < n_lines:
                    vi, vq = iq_i[base + l + M, s], iq_q[base + l + M, s]
                bi = shift_in(bi, vi, M)
                bq = shift_in(bq, vq, M)
                ai, aq = 0.0, 0.0
                for m in ti.static(range(2 * M + 1)):
                    ai += w[m] * bi[m]
                    aq += w[m] * bq[m]
                d, cs = (incoh[base + l, s], c[s]) if ti.static(mean) else (0.0, 0.0)
                bmode[base + l, s] = bmode_value(ai, aq, s, mean, d, cs, gain_db,
                                                 tgc_db_per_sample, dynamic_range_db)
