"""Acoustic-property volume (mapping applied per voxel) and the march: trilinear sampling of
it along every ray, with tissue-fixed coherent scatterers.

Per sample (r, s) it writes, all with shape (n_lines, n_samples):
  z      acoustic impedance minus echo.Z_REF (MRayl; deviations keep f32 precision)
  alpha  attenuation (dB/cm/MHz)
  scat, scat_q  complex (I, Q) sum of tissue-fixed point scatterers around the sample, phase
         relative to the sample (dimensionless; see :func:`scatterer_sum`)
  cosw   |cos| of the angle between the ray and the impedance-gradient normal (0..1)
Outside the volume the background tissue (coupling water) is assumed.

Scatterers (coherent speckle, :func:`scatterer_sum`): world space is cut into cubic cells of
``cell_mm`` (lattice shifted by LATTICE_SHIFT cells); each cell holds a scatterer at its lattice
point with a complex amplitude A = a + ib (a, b zero-mean, independent, E|A|^2 = 1), from an
integer hash of the cell index and the seed (no stored texture: the pattern is fixed in tissue and
unbounded). Sample x on a ray with direction d gathers the 8 cells around it with trilinear weights,
each rotated by its round-trip phase -2k (p - x).d (k = 2 pi / wavelength; the phase of A places
the scatterer at a random sub-wavelength depth along the beam): the RF is complex (I/Q) and the
pulse (image.axial_iq) sums it coherently. No sin/cos per scatterer: exp(-i 2k (p - x).d) =
exp(i 2k h f.d) P[a, b, c] with f the fractional cell position of x and P the phasors of the 7
cell steps (:func:`cell_phasors`), all from :func:`fast_cos_sin` (polynomial). ``n_elev`` static
elevation planes (offsets ``elev_off[s, e]`` mm along the probe's elevation axis ``ey``, amplitude
weights ``elev_w[s, e]``) add the slice thickness.
"""

import taichi as ti

from .echo import Z_REF
from .launch import fast_call
from .rays import dot3, mat3_vec, voxel_affine


@ti.func
def fetch(vol: ti.template(), i, j, k, outside):
    """Voxel (i, j, k) of a vector field, ``outside`` beyond the grid."""
    v = outside
    if 0 <= i < vol.shape[0] and 0 <= j < vol.shape[1] and 0 <= k < vol.shape[2]:
        v = ti.cast(vol[i, j, k], float)
    return v


def _on_cpu() -> bool:
    """For ti.static: whether the kernel being compiled targets the CPU backend."""
    return ti.lang.impl.current_cfg().arch == ti.cpu


@ti.func
def _fetch8(vol: ti.template(), i, j, k, outside):
    """:func:`corners` with a bounds test per corner."""
    return (fetch(vol, i, j, k, outside), fetch(vol, i + 1, j, k, outside),
            fetch(vol, i, j + 1, k, outside), fetch(vol, i + 1, j + 1, k, outside),
            fetch(vol, i, j, k + 1, outside), fetch(vol, i + 1, j, k + 1, outside),
            fetch(vol, i, j + 1, k + 1, outside), fetch(vol, i + 1, j + 1, k + 1, outside))


@ti.func
def corners(vol: ti.template(), i, j, k, outside):
    """The 8 voxels (i..i+1, j..j+1, k..k+1) of a vector field as a tuple ordered c000, c100,
    c010, c110, c001, c101, c011, c111 (cabc = voxel (i + a, j + b, k + c)); ``outside`` beyond
    the grid. On CPU one bounds test for the whole block when it lies inside the grid (nearly
    always: ~40 instead of ~150 instructions per voxel a ray enters; the fused march 1.69 ->
    1.56 ms), else one per corner; GPU backends test each corner (on Vulkan/lavapipe the two
    paths made the render ~15 % slower)."""
    c000, c100, c010, c110 = outside, outside, outside, outside       # local copies
    c001, c101, c011, c111 = outside, outside, outside, outside
    if ti.static(not _on_cpu()):
        c000, c100, c010, c110, c001, c101, c011, c111 = _fetch8(vol, i, j, k, outside)
    elif 0 <= i < vol.shape[0] - 1 and 0 <= j < vol.shape[1] - 1 and 0 <= k < vol.shape[2] - 1:
        c000, c100 = ti.cast(vol[i, j, k], float), ti.cast(vol[i + 1, j, k], float)
        c010, c110 = ti.cast(vol[i, j + 1, k], float), ti.cast(vol[i + 1, j + 1, k], float)
        c001, c101 = ti.cast(vol[i, j, k + 1], float), ti.cast(vol[i + 1, j, k + 1], float)
        c011 = ti.cast(vol[i, j + 1, k + 1], float)
        c111 = ti.cast(vol[i + 1, j + 1, k + 1], float)
    else:
        c000, c100, c010, c110, c001, c101, c011, c111 = _fetch8(vol, i, j, k, outside)
    return c000, c100, c010, c110, c001, c101, c011, c111


@ti.func
def no_cached_voxel():
    """An empty voxel cache for :func:`cached_coeffs`: (voxel index, 8 zero 3-vectors)."""
    z = ti.Vector([0.0, 0.0, 0.0])
    return ti.Vector([-(1 << 30), 0, 0]), z, z, z, z, z, z, z, z


@ti.func
def interp_corners(c000, c100, c010, c110, c001, c101, c011, c111, fx, fy, fz):
    """Trilinear value (C,) inside a voxel cell with corners :func:`corners` at fractional
    position (fx, fy, fz), and the index-space gradient (3,) of channel 0."""
    c00 = c000 + fx * (c100 - c000)
    c10 = c010 + fx * (c110 - c010)
    c01 = c001 + fx * (c101 - c001)
    c11 = c011 + fx * (c111 - c011)
    c0 = c00 + fy * (c10 - c00)
    c1 = c01 + fy * (c11 - c01)
    val = c0 + fz * (c1 - c0)
    # analytic derivatives of the trilinear interpolant, channel 0
    dx0 = (c100[0] - c000[0]) + fy * ((c110[0] - c010[0]) - (c100[0] - c000[0]))
    dx1 = (c101[0] - c001[0]) + fy * ((c111[0] - c011[0]) - (c101[0] - c001[0]))
    gx = dx0 + fz * (dx1 - dx0)
    gy = (c10[0] - c00[0]) + fz * ((c11[0] - c01[0]) - (c10[0] - c00[0]))
    gz = c1[0] - c0[0]
    return val, ti.Vector([gx, gy, gz])


@ti.func
def cached_coeffs(vol: ti.template(), outside, p, ci, k0, k1, k2, k3, k4, k5, k6, k7):
    """Voxel I of position p, the fractional position (3,) in it and the voxel's trilinear
    polynomial k0 + k1 x + k2 y + k3 z + k4 xy + k5 xz + k6 yz + k7 xyz (x, y, z the fractional
    position; k: (C,) each), made from its 8 corners (:func:`corners`) only when I differs from
    the cached voxel ci with polynomial k0..k7 (a ray stays in one voxel for several samples).
    Evaluating it (:func:`eval_coeffs`) takes about half the operations of
    :func:`interp_corners`. Returns (I, frac, k0..k7)."""
    f0 = ti.floor(p)
    I = ti.Vector([ti.cast(f0[0], ti.i32), ti.cast(f0[1], ti.i32), ti.cast(f0[2], ti.i32)])
    n0, n1, n2, n3, n4, n5, n6, n7 = k0, k1, k2, k3, k4, k5, k6, k7
    if I[0] != ci[0] or I[1] != ci[1] or I[2] != ci[2]:
        c000, c100, c010, c110, c001, c101, c011, c111 = corners(vol, I[0], I[1], I[2], outside)
        n0, n1, n2, n3 = c000, c100 - c000, c010 - c000, c001 - c000
        n4 = (c110 - c100) - (c010 - c000)
        n5 = (c101 - c100) - (c001 - c000)
        n6 = (c011 - c010) - (c001 - c000)
        n7 = ((c111 - c110) - (c101 - c100)) - ((c011 - c010) - (c001 - c000))
    return I, p - f0, n0, n1, n2, n3, n4, n5, n6, n7


@ti.func
def eval_coeffs(k0, k1, k2, k3, k4, k5, k6, k7, fx, fy, fz):
    """Value (C,) of the trilinear polynomial of :func:`cached_coeffs` at (fx, fy, fz), and the
    index-space gradient (3,) of channel 0 (the same interpolant as :func:`interp_corners`,
    rounded differently)."""
    u = k2 + fx * k4
    v = k6 + fx * k7
    w = k3 + fx * k5
    val = (k0 + fx * k1) + fy * u + fz * (w + fy * v)
    gx = k1[0] + fy * k4[0] + fz * (k5[0] + fy * k7[0])
    return val, ti.Vector([gx, u[0] + fz * v[0], w[0] + fy * v[0]])


@ti.func
def trilinear(vol: ti.template(), p, outside):
    """Trilinear value (C,) at voxel position p, and the index-space gradient (3,) of
    channel 0."""
    f0 = ti.floor(p)
    i, j, k = ti.cast(f0[0], ti.i32), ti.cast(f0[1], ti.i32), ti.cast(f0[2], ti.i32)
    c000, c100, c010, c110, c001, c101, c011, c111 = corners(vol, i, j, k, outside)
    return interp_corners(c000, c100, c010, c110, c001, c101, c011, c111,
                          p[0] - f0[0], p[1] - f0[1], p[2] - f0[2])


# lattice hash of cell (i, j, k) and seed: fmix_u32(i A ^ j B ^ k C ^ seed D), (A, B, C, D) =
HASH_MUL = (73856093, 19349663, 83492791, 2654435761)


# lattice origin shift (cells): keeps the lattice planes off the round world coordinates that test
# objects and default poses use (a plane through the samples would weight one cell only)
LATTICE_SHIFT = (0.3183, 0.5772, 0.1416)
# Amplitude scale: E|scat|^2 = AMP^2 E[a^2] mean(sum of squared trilinear weights) = AMP^2 (2/3)^3
# = 0.3 per unit scattering strength, the level of the earlier value-noise model (same brightness).
SCAT_AMP = 0.3 ** 0.5 / (2.0 / 3.0) ** 1.5


@ti.func
def trilinear_value(vol: ti.template(), p, outside):
    """Trilinear value (C,) at voxel position p (no gradient output)."""
    f0 = ti.floor(p)
    i, j, k = ti.cast(f0[0], ti.i32), ti.cast(f0[1], ti.i32), ti.cast(f0[2], ti.i32)
    f = p - f0
    acc = outside * 0.0
    for a, b, c in ti.static(ti.ndrange(2, 2, 2)):
        w = (f[0] if a else 1.0 - f[0]) * (f[1] if b else 1.0 - f[1]) * (f[2] if c else 1.0 - f[2])
        acc += w * fetch(vol, i + a, j + b, k + c, outside)
    return acc


@ti.func
def fmix_u32(h):
    """murmur3 finaliser of a u32."""
    h ^= h >> ti.u32(16)
    h *= ti.u32(0x85EBCA6B)
    h ^= h >> ti.u32(13)
    h *= ti.u32(0xC2B2AE35)
    h ^= h >> ti.u32(16)
    return h


@ti.func
def _byte_pair(h):
    """Zero-mean value of variance 1/2 from the two low bytes of h: sum of two uniforms
    (triangular; the sum over the ~10^2 scatterers of a resolution cell is Gaussian anyway)."""
    u = ti.cast(h & ti.u32(0xFF), ti.i32) + ti.cast((h >> ti.u32(8)) & ti.u32(0xFF), ti.i32)
    return (ti.cast(u, float) - 255.0) * (1.7320508075688772 / 256.0)


_COS_POLY_AT_HALF_PI = -4.6476600834566284e-07   # value of the degree-10 cos polynomial at pi/2


@ti.func
def fast_cos_sin(t):
    """(cos t, sin t) to ~4e-6 for moderate |t| (range reduction to [-pi, pi], half-angle Taylor
    polynomials, double-angle formulas): ~3x cheaper than ti.cos + ti.sin on CPU; exact
    gradient of the polynomial (the reduction step has zero gradient, as it should)."""
    n = ti.floor(t * 0.15915494309189535 + 0.5)
    u = 0.5 * (t - n * 6.283185307179586)
    u2 = u * u
    sn = u * (1.0 - u2 / 6.0 * (1.0 - u2 / 20.0 * (1.0 - u2 / 42.0 * (1.0 - u2 / 72.0))))
    cs = 1.0 - u2 / 2.0 * (1.0 - u2 / 12.0 * (1.0 - u2 / 30.0 * (1.0 - u2 / 56.0 * (1.0 - u2 / 90.0))))
    cs -= _COS_POLY_AT_HALF_PI * u2 * 0.40528473456935109   # (2/pi)^2: cs(+-pi/2) = 0 exactly,
    return cs * cs - sn * sn, 2.0 * sn * cs                 # so sin t is continuous at the wrap


@ti.func
def cell_phasors(d, k2h):
    """(8, 2) matrix, row 4a + 2b + c = [cos, sin] of -k2h (a dx + b dy + c dz): the round-trip
    phase of the lattice step (a, b, c) in {0, 1}^3 seen along unit direction d."""
    cx, sx = fast_cos_sin(-k2h * d[0])
    cy, sy = fast_cos_sin(-k2h * d[1])
    cz, sz = fast_cos_sin(-k2h * d[2])
    cxy, sxy = cx * cy - sx * sy, cx * sy + sx * cy
    cxz, sxz = cx * cz - sx * sz, cx * sz + sx * cz
    cyz, syz = cy * cz - sy * sz, cy * sz + sy * cz
    cxyz, sxyz = cxy * cz - sxy * sz, cxy * sz + sxy * cz
    return ti.Matrix([[1.0, 0.0], [cz, sz], [cy, sy], [cyz, syz],
                      [cx, sx], [cxz, sxz], [cxy, sxy], [cxyz, sxyz]])


@ti.func
def _lattice_cell(x, inv_cell_mm, seed):
    """Fractional position f (3,) of world x (mm) in its scatterer-lattice cell (i, j, k) and the
    hash products i A, j B, k C, seed D (u32, HASH_MUL) of that cell."""
    q = x * inv_cell_mm + ti.Vector(LATTICE_SHIFT)
    f0 = ti.floor(q)
    i, j, k = ti.cast(f0[0], ti.i32), ti.cast(f0[1], ti.i32), ti.cast(f0[2], ti.i32)
    return (q - f0, ti.cast(i, ti.u32) * ti.u32(HASH_MUL[0]), ti.cast(j, ti.u32) * ti.u32(HASH_MUL[1]),
            ti.cast(k, ti.u32) * ti.u32(HASH_MUL[2]), ti.cast(seed, ti.u32) * ti.u32(HASH_MUL[3]))


@ti.func
def scatterer_sum(P, x, d, inv_cell_mm, k2h, seed):
    """Complex sum (I, Q) of the tissue-fixed scatterers of the 8 lattice cells around world x
    (mm) seen along unit direction d: sum_j w_j A_j exp(-i 2k (c_j - x).d), w_j the trilinear
    weights of x, c_j the cell's lattice point, A_j = a_j + i b_j its hashed complex amplitude
    (a, b zero-mean, independent, E|A|^2 = 1; its phase places the scatterer at a random
    sub-wavelength depth along the beam). k2h = 2k * cell_mm (rad); P = cell_phasors(d, k2h)."""
    f, hx0, hy0, hz0, hs = _lattice_cell(x, inv_cell_mm, seed)
    bc, bs = fast_cos_sin(k2h * dot3(f, d))
    # lattice hash (HASH_MUL) of the 8 cells, the per-axis products formed once (wrap-around
    # arithmetic: (i + 1) A = i A + A); a = bytes 0-1, b = bytes 2-3 of the one hash per cell
    hx = (hx0, hx0 + ti.u32(HASH_MUL[0]))
    hy = (hy0, hy0 + ti.u32(HASH_MUL[1]))
    hz = (hz0 ^ hs, (hz0 + ti.u32(HASH_MUL[2])) ^ hs)
    # the 8 cells' hashes as one u32 8-vector, entry 4a + 2b + c = cell (i+a, j+b, k+c): the
    # same arithmetic per entry as 8 scalar calls, but prepared once (ti.func inlining costs
    # ~1 ms of kernel preparation per call)
    h8 = fmix_u32(ti.Vector([hx[a] ^ hy[b] ^ hz[c] for a, b, c in ti.static(ti.ndrange(2, 2, 2))]))
    A8 = _byte_pair(h8)                              # variance 1/2 each
    B8 = _byte_pair(h8 >> ti.u32(16))
    ai, aq = 0.0, 0.0
    for a, b, c in ti.static(ti.ndrange(2, 2, 2)):
        w = (f[0] if a else 1.0 - f[0]) * (f[1] if b else 1.0 - f[1]) * (f[2] if c else 1.0 - f[2])
        n = ti.static(4 * a + 2 * b + c)
        sa = w * A8[n]
        sb = w * B8[n]
        if ti.static(n == 0):
            ai += sa
            aq += sb
        else:
            pr, pi = P[n, 0], P[n, 1]
            ai += sa * pr - sb * pi
            aq += sa * pi + sb * pr
    return SCAT_AMP * (ai * bc - aq * bs), SCAT_AMP * (ai * bs + aq * bc)


@ti.func
def elevation_axis(d, t):
    """Unit elevation axis (world) of the ray of unit direction d, t a lateral vector in its
    image plane (from the neighbour rays): the normal of that plane."""
    e = ti.Vector([d[1] * t[2] - d[2] * t[1], d[2] * t[0] - d[0] * t[2],
                   d[0] * t[1] - d[1] * t[0]])         # d x t (as Taichi's cross)
    return e / ti.sqrt(dot3(e, e) + 1e-30)


@ti.kernel
def elevation_axes(ro: ti.template(), rd: ti.template(), w2v: ti.template(), ey: ti.template(),
                   eyv: ti.template(), n_lines: ti.i32):
    """Unit elevation axis of each ray (world, (rays,) vec3) and the same vector in voxel
    index units: the normal of the image plane spanned by the ray and its neighbours in the
    same frame (rays r = b n_lines + l)."""
    for r in ey:
        first = r - r % n_lines
        r1, r2 = ti.max(r - 1, first), ti.min(r + 1, first + n_lines - 1)
        e = elevation_axis(rd[r], (ro[r2] - ro[r1]) + (rd[r2] - rd[r1]))
        ey[r] = e
        M, _ = voxel_affine(w2v[None])
        eyv[r] = mat3_vec(M, e)


@ti.func
def channels_to_props(ch, n_ch: ti.template(), table: ti.template(), chan_tissue: ti.template(),
                      tf: ti.template(), tf_chan: ti.template()):
    """One voxel's channels ch (n_ch,) -> [Z - Z_REF (MRayl), alpha dB/cm/MHz, scattering] (3,)
    (see :func:`acoustic_volume`)."""
    prop = ti.Vector([0.0, 0.0, 0.0])
    ref = ti.Vector([Z_REF, 0.0, 0.0])
    if ti.static(tf_chan >= 0):
        K = tf.shape[0]
        x = ti.min(ti.max(ch[tf_chan], 0.0), 1.0) * (K - 1)
        i = ti.min(ti.cast(ti.floor(x), ti.i32), K - 2)
        f = x - i
        for c in ti.static(range(3)):   # deviation first: (lo - ref) + f (hi - lo)
            prop[c] = (tf[i, c] - ref[c]) + f * (tf[i + 1, c] - tf[i, c])
    else:
        for c in ti.static(range(3)):
            prop[c] = table[0, c] - ref[c]
        for c in ti.static(range(n_ch)):
            t = chan_tissue[c]
            if t >= 0:
                prop += ch[c] * (ti.Vector([table[t, 0], table[t, 1], table[t, 2]])
                                 - ti.Vector([table[0, 0], table[0, 1], table[0, 2]]))
    return prop


@ti.kernel
def acoustic_volume(vol: ti.template(), table: ti.template(), chan_tissue: ti.template(),
                    tf: ti.template(), tf_chan: ti.template(), props: ti.template()):
    """Per voxel: channels (C,) -> [Z - Z_REF (MRayl), alpha dB/cm/MHz, scattering] (3,).

    table (T, 3) rows with row 0 the background tissue; chan_tissue (C,) row per channel or -1;
    tf (K, 3) transfer-function knots, used instead of the table when tf_chan >= 0 (static)."""
    for I in ti.grouped(vol):
        props[I] = channels_to_props(ti.cast(vol[I], float), vol.n, table, chan_tissue, tf, tf_chan)


@ti.kernel
def _march_fwd(props: ti.template(), outside: ti.template(), vo: ti.template(), vd: ti.template(),
               ro: ti.template(), rd: ti.template(), ey: ti.template(), eyv: ti.template(),
               gradT: ti.template(), step_mm: float, inv_cell_mm: float, k2h: float,
               seeds: ti.template(), elev_off: ti.template(), elev_w: ti.template(),
               n_elev: ti.template(), noise_on: ti.template(),
               z: ti.template(), alpha: ti.template(), scat: ti.template(), scat_q: ti.template(),
               cosw: ti.template(), pad: ti.template(), jac: ti.template(), use_jac: ti.template(),
               gsc: ti.template(), split: ti.template()):
    """use_jac (static, with noise_on): also store each sample's scatterer-sum Jacobian per
    elevation plane in jac (rays, samples, n_elev) 15-vectors (:func:`_scatterer_sum_jac`'s 14
    values, then the plane's scattering strength), so that :func:`_march_bwd` need not hash
    the lattice again. With one elevation plane the scatterer sums (and Jacobians) of a ray's
    samples are computed first, in a loop without loop-carried state that LLVM vectorises
    across samples (AVX2: 8 at a time); the serial loop (voxel cache) then reads them.
    split (static; CPU): the serial loop keeps each sample's index-space gradient in gsc
    (rays, samples) 3-vectors (SoA) and the incidence angles follow in a loop that vectorises
    (:func:`_march_bwd` reads the gradients there too)."""
    for rr in range(z.shape[0] * pad):   # rays in parallel (backend.ray_loop_pad), samples serial
        if rr % pad != 0:
            continue
        r = rr // pad
        P = cell_phasors(rd[r], k2h)
        R = ti.Matrix.zero(float, 3, 2)
        if ti.static(use_jac):
            R = phasor_log_derivs(rd[r], k2h)
        seed = seeds[r // (z.shape[0] // seeds.shape[0])]
        if ti.static(noise_on and n_elev == 1):
            # the scatterer sums (and Jacobians) of all samples first, in a loop without
            # loop-carried state (LLVM vectorises it across samples): into jac, or parked
            # in scat/scat_q[r, s], which the serial loop reads before it writes them
            o_w, d_w, e_w = ro[r], rd[r], ey[r]
            if ti.static(use_jac):
                for s in range(z.shape[1]):
                    xs = (o_w + (s * step_mm) * d_w) + elev_off[s, 0] * e_w
                    _store_jac(jac, r, s, 0, _scatterer_sum_jac(P, R, xs, d_w, inv_cell_mm,
                                                                k2h, seed))
            else:
                ray_scatterer_sums(P, o_w, d_w, e_w, step_mm, elev_off, inv_cell_mm, k2h, seed,
                                   r, scat, scat_q)
        ci, k0, k1, k2, k3, k4, k5, k6, k7 = no_cached_voxel()   # voxel cache (polynomial)
        for s in range(z.shape[1]):
            d_mm = s * step_mm
            pv = vo[r] + d_mm * vd[r]
            ci, fr, k0, k1, k2, k3, k4, k5, k6, k7 = cached_coeffs(
                props, outside[None], pv, ci, k0, k1, k2, k3, k4, k5, k6, k7)
            prop, gidx = eval_coeffs(k0, k1, k2, k3, k4, k5, k6, k7, fr[0], fr[1], fr[2])
            if ti.static(split):
                gsc[r, s] = gidx
            else:
                cosw[r, s] = incidence_cos(mat3_vec(gradT[None], gidx), rd[r])
            z[r, s] = prop[0]
            alpha[r, s] = prop[1]
            if ti.static(noise_on and n_elev == 1):       # as speckle_sample, sums from above
                J01 = ti.Vector([0.0, 0.0])
                if ti.static(use_jac):
                    J01 = ti.Vector([jac[r, s, 0][0], jac[r, s, 0][1]])
                    jac[r, s, 0][14] = prop[2]                 # the strength, for the backward
                else:
                    J01 = ti.Vector([scat[r, s], scat_q[r, s]])
                si, sq = 0.0, 0.0
                si += elev_w[s, 0] * prop[2] * J01[0]
                sq += elev_w[s, 0] * prop[2] * J01[1]
                scat[r, s], scat_q[r, s] = si, sq
            elif ti.static(noise_on):
                scat[r, s], scat_q[r, s] = speckle_sample(
                    props, outside, P, prop[2], pv, ro[r] + d_mm * rd[r], r, s, rd, ey, eyv,
                    inv_cell_mm, k2h, seed, elev_off, elev_w, n_elev, R, jac, use_jac)
            else:   # scattering strength only (expected-intensity image formation)
                scat[r, s] = prop[2]
                scat_q[r, s] = 0.0
        if ti.static(split):
            G, d = gradT[None], rd[r]
            for s in range(z.shape[1]):
                cosw[r, s] = incidence_cos(mat3_vec(G, gsc[r, s]), d)


@ti.func
def _poly_cos_sin_grad(t):
    """(cos t, sin t, d cos/dt, d sin/dt) of :func:`fast_cos_sin`: the same polynomials and
    their exact derivatives (so the hand-written backward equals the derivative of the forward)."""
    n = ti.floor(t * 0.15915494309189535 + 0.5)
    u = 0.5 * (t - n * 6.283185307179586)
    u2 = u * u
    sn = u * (1.0 - u2 / 6.0 * (1.0 - u2 / 20.0 * (1.0 - u2 / 42.0 * (1.0 - u2 / 72.0))))
    cs = 1.0 - u2 / 2.0 * (1.0 - u2 / 12.0 * (1.0 - u2 / 30.0 * (1.0 - u2 / 56.0 * (1.0 - u2 / 90.0))))
    kc = _COS_POLY_AT_HALF_PI * 0.40528473456935109
    cs -= kc * u2
    dsn = 1.0 - u2 / 2.0 * (1.0 - u2 / 12.0 * (1.0 - u2 / 30.0 * (1.0 - u2 / 56.0)))   # d sn/du
    dcs = -u * (1.0 - u2 / 6.0 * (1.0 - u2 / 20.0 * (1.0 - u2 / 42.0 * (1.0 - u2 / 72.0)))) \
        - 2.0 * kc * u
    # c = cs^2 - sn^2, s = 2 sn cs, du/dt = 1/2
    return cs * cs - sn * sn, 2.0 * sn * cs, cs * dcs - sn * dsn, dsn * cs + sn * dcs


@ti.func
def _cmul(ar, ai, br, bi):
    return ar * br - ai * bi, ar * bi + ai * br


@ti.func
def phasor_log_derivs(d, k2h):
    """(3, 2): (dQ_i/dd_i) / Q_i (complex) of the per-axis phasors Q_i = phase of -k2h d_i that
    :func:`cell_phasors` composes."""
    R = ti.Matrix.zero(float, 3, 2)
    for ax in ti.static(range(3)):
        c_, s_, dc, ds = _poly_cos_sin_grad(-k2h * d[ax])
        m2 = c_ * c_ + s_ * s_
        R[ax, 0], R[ax, 1] = _cmul(-k2h * dc, -k2h * ds, c_ / m2, -s_ / m2)
    return R


@ti.func
def _scatterer_sum_grad(P, R, x, d, inv_cell_mm, k2h, seed, lr, li):
    """:func:`scatterer_sum` (a, b) at world x (mm) along d, and the adjoints dL/dx, dL/dd (3,)
    for output adjoints (lr, li) = (dL/da, dL/db): :func:`_scatterer_sum_jac` and
    :func:`_apply_jac`."""
    J = _scatterer_sum_jac(P, R, x, d, inv_cell_mm, k2h, seed)
    gx, gd = _apply_jac(J, lr, li, inv_cell_mm)
    return J[0], J[1], gx, gd


@ti.func
def ray_scatterer_sums(P, o, d, e_ax, step_mm, elev_off: ti.template(), inv_cell_mm, k2h, seed,
                       r, a_out: ti.template(), b_out: ti.template()):
    """(a_out, b_out)[r, s] = :func:`scatterer_sum` of every sample s of ray r (world origin o
    mm, unit direction d, elevation axis e_ax; one elevation plane, offsets elev_off[s, 0]), in
    a loop without loop-carried state, which LLVM vectorises across samples."""
    for s in range(a_out.shape[1]):
        a_out[r, s], b_out[r, s] = scatterer_sum(
            P, (o + (s * step_mm) * d) + elev_off[s, 0] * e_ax, d, inv_cell_mm, k2h, seed)


@ti.func
def _store_jac(jac: ti.template(), r, s, e, J):
    """jac[r, s, e][:14] = J (:func:`_scatterer_sum_jac`; component 14 holds the plane's
    scattering strength, written by the march)."""
    for k in ti.static(range(14)):
        jac[r, s, e][k] = J[k]


@ti.func
def _apply_jac(J, lr, li, inv_cell_mm):
    """Adjoints dL/dx, dL/dd (3,) of the scatterer sum for output adjoints (lr, li), from its
    :func:`_scatterer_sum_jac` J."""
    gx = ti.Vector([(lr * J[2 + ax] + li * J[5 + ax]) * inv_cell_mm for ax in ti.static(range(3))])
    gd = ti.Vector([lr * J[8 + ax] + li * J[11 + ax] for ax in ti.static(range(3))])
    return SCAT_AMP * gx, SCAT_AMP * gd


@ti.func
def _scatterer_sum_jac(P, R, x, d, inv_cell_mm, k2h, seed):
    """(14,): [a, b] = :func:`scatterer_sum` at world x (mm) along d, then the per-axis partial
    derivatives without SCAT_AMP, X_r, X_i (d(a, b)/df, f the fractional lattice position,
    df/dx = inv_cell_mm) and D_r, D_i (d(a, b)/dd), 3 each: all the adjoint needs for any
    output adjoints (:func:`_apply_jac`). P = cell_phasors(d, k2h); R (3, 2): the
    complex logarithmic derivatives (dQ_i/dd_i) / Q_i of the per-axis phasors Q_i that P is
    composed of (P_j = prod_i Q_i^{j_i}, so dP_j/dd_i = j_i R_i P_j).

    With f the fractional lattice position, w_j the trilinear weights and A_j the amplitudes:
    out = AMP S B, S = sum_j w_j A_j P_j, B = exp(i k2h f.d), so
    d out/d f = AMP (sum_j grad w_j A_j P_j) B + AMP S B' k2h d and
    d out/d d_i = AMP R_i (sum_{j_i = 1} w_j A_j P_j) B + AMP S B' k2h f_i."""
    f, hx0, hy0, hz0, hs = _lattice_cell(x, inv_cell_mm, seed)
    bc, bs, dbc, dbs = _poly_cos_sin_grad(k2h * f.dot(d))
    hx = (hx0, hx0 + ti.u32(HASH_MUL[0]))
    hy = (hy0, hy0 + ti.u32(HASH_MUL[1]))
    hz = (hz0 ^ hs, (hz0 + ti.u32(HASH_MUL[2])) ^ hs)
    Sr, Si = 0.0, 0.0                                             # S
    Fr, Fi = ti.Vector.zero(float, 3), ti.Vector.zero(float, 3)   # sum_j grad w_j A_j P_j
    Tr, Ti = ti.Vector.zero(float, 3), ti.Vector.zero(float, 3)   # sum_{j_i = 1} w_j A_j P_j
    h8 = fmix_u32(ti.Vector([hx[a] ^ hy[b] ^ hz[c] for a, b, c in ti.static(ti.ndrange(2, 2, 2))]))
    A8, B8 = _byte_pair(h8), _byte_pair(h8 >> ti.u32(16))        # as scatterer_sum
    for a, b, c in ti.static(ti.ndrange(2, 2, 2)):
        wx = f[0] if a else 1.0 - f[0]
        wy = f[1] if b else 1.0 - f[1]
        wz = f[2] if c else 1.0 - f[2]
        w = wx * wy * wz
        n = ti.static(4 * a + 2 * b + c)
        Ar, Ai = A8[n], B8[n]
        Cr, Ci = Ar, Ai
        if ti.static(n != 0):
            Cr, Ci = _cmul(Ar, Ai, P[n, 0], P[n, 1])
        wr, wi = w * Cr, w * Ci
        Sr += wr
        Si += wi
        gw = ti.Vector([(1.0 if a else -1.0) * wy * wz, wx * (1.0 if b else -1.0) * wz,
                        wx * wy * (1.0 if c else -1.0)])
        Fr += gw * Cr
        Fi += gw * Ci
        bits = ti.static((a, b, c))
        for ax in ti.static(range(3)):
            if ti.static(bits[ax]):
                Tr[ax] += wr
                Ti[ax] += wi
    outr, outi = _cmul(Sr, Si, bc, bs)
    opr, opi = _cmul(Sr, Si, dbc, dbs)                 # d out/d theta (without AMP)
    J = ti.Vector([0.0] * 14)
    J[0], J[1] = SCAT_AMP * outr, SCAT_AMP * outi
    for ax in ti.static(range(3)):
        fr_, fi_ = _cmul(Fr[ax], Fi[ax], bc, bs)
        er, ei = _cmul(Tr[ax], Ti[ax], R[ax, 0], R[ax, 1])
        dr_, di_ = _cmul(er, ei, bc, bs)
        J[2 + ax], J[5 + ax] = fr_ + opr * k2h * d[ax], fi_ + opi * k2h * d[ax]
        J[8 + ax], J[11 + ax] = dr_ + opr * k2h * f[ax], di_ + opi * k2h * f[ax]
    return J


@ti.func
def _corner_weights(fx, fy, fz):
    """Trilinear weights w (8,) of the corners in :func:`corners` order and their gradients
    (8, 3) w.r.t. the fractional position."""
    w = ti.Vector.zero(float, 8)
    gw = ti.Matrix.zero(float, 8, 3)
    for a, b, c in ti.static(ti.ndrange(2, 2, 2)):
        n = ti.static(a + 2 * b + 4 * c)
        wx = fx if a else 1.0 - fx
        wy = fy if b else 1.0 - fy
        wz = fz if c else 1.0 - fz
        sx, sy, sz = (1.0 if a else -1.0), (1.0 if b else -1.0), (1.0 if c else -1.0)
        w[n] = wx * wy * wz
        gw[n, 0] = sx * wy * wz
        gw[n, 1] = wx * sy * wz
        gw[n, 2] = wx * wy * sz
    return w, gw


@ti.func
def _scatter_props_grad(props: ti.template(), I, w, gw, gval, ggrad0):
    """props.grad at the 8 corners of voxel I += w gval + [gw . ggrad0, 0, 0] (inside the
    grid only: beyond it the constant ``outside`` was read)."""
    for a, b, c in ti.static(ti.ndrange(2, 2, 2)):
        n = ti.static(a + 2 * b + 4 * c)
        i, j, k = I[0] + a, I[1] + b, I[2] + c
        if 0 <= i < props.shape[0] and 0 <= j < props.shape[1] and 0 <= k < props.shape[2]:
            g = w[n] * gval
            g[0] += gw[n, 0] * ggrad0[0] + gw[n, 1] * ggrad0[1] + gw[n, 2] * ggrad0[2]
            props.grad[i, j, k] += g


@ti.kernel
def _march_bwd(props: ti.template(), outside: ti.template(), vo: ti.template(), vd: ti.template(),
               ro: ti.template(), rd: ti.template(), ey: ti.template(), eyv: ti.template(),
               gradT: ti.template(), step_mm: float, inv_cell_mm: float, k2h: float,
               seeds: ti.template(), elev_off: ti.template(), elev_w: ti.template(),
               n_elev: ti.template(), noise_on: ti.template(),
               z: ti.template(), alpha: ti.template(), scat: ti.template(), scat_q: ti.template(),
               cosw: ti.template(), pad: ti.template(), jac: ti.template(), use_jac: ti.template(),
               gsc: ti.template(), split: ti.template(), props_grad: ti.template()):
    """Hand-written adjoint of :func:`_march_fwd`: per ray, the adjoints of the rays (vo, vd,
    ro, rd, ey, eyv) are summed over the samples in registers and written once (the automatic
    one added into them atomically for every sample: ~3x the forward's cost); with
    ``props_grad`` (static) also props.grad (atomically: rays share voxels); use_jac (static):
    the scatterer-sum Jacobians the forward stored in jac instead of recomputing them (one
    elevation plane: their contribution to the ray adjoints summed in a separate, vectorised
    loop over the samples). split (static; CPU): the incidence angle's adjoint from the
    gradients the forward kept in gsc, in a loop that vectorises, written back into gsc (the
    adjoint of each sample's index-space gradient) for the serial loop."""
    for rr in range(z.shape[0] * pad):
        if rr % pad != 0:
            continue
        r = rr // pad
        S = z.shape[1]
        d = rd[r]
        o, dv, ow, e_w, e_v = vo[r], vd[r], ro[r], ey[r], eyv[r]
        G = gradT[None]
        seed = seeds[r // (z.shape[0] // seeds.shape[0])]
        P = cell_phasors(d, k2h)
        R = phasor_log_derivs(d, k2h)
        g_vo, g_vd, g_ro, g_rd = (ti.Vector.zero(float, 3), ti.Vector.zero(float, 3),
                                  ti.Vector.zero(float, 3), ti.Vector.zero(float, 3))
        g_ey, g_eyv = ti.Vector.zero(float, 3), ti.Vector.zero(float, 3)
        pre = ti.static(noise_on and use_jac and n_elev == 1)
        if ti.static(pre):
            # the scatterer sums' adjoints into the ray first (a reduction over the samples
            # without other loop-carried state: LLVM vectorises it), from the Jacobians and
            # strengths the forward kept
            for s in range(S):
                J = jac[r, s, 0]
                w_st = elev_w[s, 0] * J[14]
                gx, gd = _apply_jac(J, w_st * scat.grad[r, s], w_st * scat_q.grad[r, s],
                                    inv_cell_mm)
                g_ro += gx
                g_rd += (s * step_mm) * gx + gd
                g_ey += elev_off[s, 0] * gx
        if ti.static(split):
            # the incidence angle's adjoint (another reduction that vectorises); gsc[r, s]:
            # the index-space gradient in, its adjoint out
            for s in range(S):
                g_d, g_gidx = _incidence_cos_adjoint(G, gsc[r, s], d, cosw.grad[r, s])
                g_rd += g_d
                gsc[r, s] = g_gidx
        ci, k0, k1, k2, k3, k4, k5, k6, k7 = no_cached_voxel()   # voxel cache (polynomial)
        for s in range(S):
            d_mm = s * step_mm
            pv = o + d_mm * dv
            ci, fr, k0, k1, k2, k3, k4, k5, k6, k7 = cached_coeffs(
                props, outside[None], pv, ci, k0, k1, k2, k3, k4, k5, k6, k7)
            I = ci
            fx, fy, fz = fr[0], fr[1], fr[2]
            prop, gidx = eval_coeffs(k0, k1, k2, k3, k4, k5, k6, k7, fx, fy, fz)
            # value Jacobian (channels x axes) and Hessian of channel 0 (trilinear: no pure terms)
            v = k6 + fx * k7
            jx = k1 + fy * k4 + fz * (k5 + fy * k7)
            jy = (k2 + fx * k4) + fz * v
            jz = (k3 + fx * k5) + fy * v
            hxy = k4[0] + fz * k7[0]
            hxz = k5[0] + fy * k7[0]
            hyz = v[0]
            g_gidx = ti.Vector([0.0, 0.0, 0.0])
            if ti.static(split):
                g_gidx = gsc[r, s]
            else:
                g_d, g_gidx = _incidence_cos_adjoint(G, gidx, d, cosw.grad[r, s])
                g_rd += g_d
            gp = ti.Vector([z.grad[r, s], alpha.grad[r, s], 0.0])
            gs, gq = scat.grad[r, s], scat_q.grad[r, s]
            if ti.static(noise_on):
                x = ow + d_mm * d
                for e in ti.static(range(n_elev)):
                    off = elev_off[s, e]
                    we = elev_w[s, e]
                    st = prop[2]
                    pe = pv
                    if ti.static(n_elev > 1):
                        pe = pv + off * e_v
                        st = trilinear_value(props, pe, outside[None])[2]
                    a, b = 0.0, 0.0
                    gx, gd = ti.Vector([0.0, 0.0, 0.0]), ti.Vector([0.0, 0.0, 0.0])
                    if ti.static(pre):                      # gx, gd summed above
                        a, b = jac[r, s, e][0], jac[r, s, e][1]
                    elif ti.static(use_jac):
                        J = jac[r, s, e]
                        a, b = J[0], J[1]
                        gx, gd = _apply_jac(J, we * st * gs, we * st * gq, inv_cell_mm)
                    else:
                        a, b, gx, gd = _scatterer_sum_grad(P, R, x + off * e_w, d, inv_cell_mm,
                                                           k2h, seed, we * st * gs, we * st * gq)
                    if ti.static(not pre):
                        g_ro += gx
                        g_rd += d_mm * gx + gd
                        g_ey += off * gx
                    g_st = we * (gs * a + gq * b)
                    if ti.static(n_elev > 1):   # strength of the offset plane: channel 2 there
                        fe = ti.floor(pe)
                        Ie = ti.Vector([ti.cast(fe[0], ti.i32), ti.cast(fe[1], ti.i32),
                                        ti.cast(fe[2], ti.i32)])
                        e000, e100, e010, e110, e001, e101, e011, e111 = corners(
                            props, Ie[0], Ie[1], Ie[2], outside[None])
                        we8, gwe8 = _corner_weights(pe[0] - fe[0], pe[1] - fe[1], pe[2] - fe[2])
                        cs8 = ti.Vector([e000[2], e100[2], e010[2], e110[2],
                                         e001[2], e101[2], e011[2], e111[2]])
                        gst = g_st * (gwe8.transpose() @ cs8)      # d/d pe (index space)
                        g_vo += gst
                        g_vd += d_mm * gst
                        g_eyv += off * gst
                        if ti.static(props_grad):
                            _scatter_props_grad(props, Ie, we8, gwe8,
                                                ti.Vector([0.0, 0.0, g_st]), ti.Vector.zero(float, 3))
                    else:
                        gp[2] += g_st
            else:
                gp[2] += gs
            # d/d pv of prop . gp + gidx . g_gidx
            g_pv = ti.Vector([jx.dot(gp) + hxy * g_gidx[1] + hxz * g_gidx[2],
                              jy.dot(gp) + hxy * g_gidx[0] + hyz * g_gidx[2],
                              jz.dot(gp) + hxz * g_gidx[0] + hyz * g_gidx[1]])
            g_vo += g_pv
            g_vd += d_mm * g_pv
            if ti.static(props_grad):
                w8, gw8 = _corner_weights(fx, fy, fz)
                _scatter_props_grad(props, I, w8, gw8, gp, g_gidx)
        vo.grad[r] += g_vo
        vd.grad[r] += g_vd
        rd.grad[r] += g_rd
        if ti.static(noise_on):
            ro.grad[r] += g_ro
            ey.grad[r] += g_ey
            if ti.static(n_elev > 1):
                eyv.grad[r] += g_eyv


def _has_grad(field) -> bool:
    """Whether a Taichi field was allocated with needs_grad=True."""
    return bool(field.snode.ptr.has_adjoint())


def _scratch_args(noise_on, jac, gsc, placeholder):
    """The kernels' (jac, use_jac, gsc, split) template arguments from march's optional jac /
    gsc (a placeholder field where one is unused)."""
    use = bool(noise_on) and jac is not None
    return (jac if use else placeholder, use, placeholder if gsc is None else gsc,
            gsc is not None)


@ti.ad.grad_replaced
def march(props, outside, vo, vd, ro, rd, ey, eyv, gradT, step_mm, inv_cell_mm, k2h, seeds,
          elev_off, elev_w, n_elev, noise_on, z, alpha, scat, scat_q, cosw, pad=1, jac=None,
          gsc=None):
    """Sample the acoustic-property volume at every (ray, sample).

    props (X, Y, Z) vec3 [MRayl, dB/cm/MHz, scattering]; outside () vec3 the background
    properties beyond the grid; gradT () 3x3 maps index-space gradients to world-mm gradients.
    noise_on (static): (scat, scat_q) = sum over the n_elev elevation planes of elev_w x the
    plane's scattering strength x :func:`scatterer_sum`; else scat = the strength alone, scat_q 0.
    Rays in parallel, samples serial; pad: index stride of the ray loop
    (:func:`backend.ray_loop_pad`). Backward: :func:`_march_bwd` (hand-written). jac: None, or
    a (rays, samples, n_elev) 15-vector field where the forward keeps the scatterer-sum
    Jacobians and the strengths for the backward (with noise_on; under a Tape: the backward then
    hashes nothing; SoA layout, ti.Layout.SOA, so that the loops over samples vectorise).
    gsc: None, or a (rays, samples) 3-vector field (SoA; CPU) for the incidence angles' loops
    that vectorise (:func:`_march_fwd`'s split; it holds the forward's index-space gradients
    until the backward has run, which overwrites them).
    """
    fast_call(_march_fwd, props, outside, vo, vd, ro, rd, ey, eyv, gradT, step_mm, inv_cell_mm,
              k2h, seeds, elev_off, elev_w, n_elev, noise_on, z, alpha, scat, scat_q, cosw, pad,
              *_scratch_args(noise_on, jac, gsc, scat))


@ti.ad.grad_for(march)
def _march_grad(props, outside, vo, vd, ro, rd, ey, eyv, gradT, step_mm, inv_cell_mm, k2h, seeds,
                elev_off, elev_w, n_elev, noise_on, z, alpha, scat, scat_q, cosw, pad=1,
                jac=None, gsc=None):
    fast_call(_march_bwd, props, outside, vo, vd, ro, rd, ey, eyv, gradT, step_mm, inv_cell_mm,
              k2h, seeds, elev_off, elev_w, n_elev, noise_on, z, alpha, scat, scat_q, cosw, pad,
              *_scratch_args(noise_on, jac, gsc, scat), _has_grad(props))


@ti.func
def incidence_cos(g, d):
    """|cos| of the angle between direction d and the gradient g (world mm)."""
    return ti.abs(dot3(g, d)) / ti.sqrt(dot3(g, g) + 1e-12)


@ti.func
def _incidence_cos_adjoint(G, gidx, d, gc):
    """Adjoints (d, index-space gradient) (3,) each of cosw = |g.d| / sqrt(g.g + 1e-12),
    g = G gidx, for the output adjoint gc."""
    g = G @ gidx
    u = g.dot(d)
    n2 = g.dot(g) + 1e-12
    sq = ti.sqrt(n2)
    sgn = ti.select(u > 0, 1.0, ti.select(u < 0, -1.0, 0.0))
    return gc * sgn / sq * g, G.transpose() @ (gc * (sgn / sq * d - ti.abs(u) / (sq * n2) * g))


@ti.func
def speckle_sample(props: ti.template(), outside: ti.template(), P, strength, pv, x, r, s,
                   rd: ti.template(), ey: ti.template(), eyv: ti.template(), inv_cell_mm, k2h,
                   seed, elev_off: ti.template(), elev_w: ti.template(), n_elev: ti.template(),
                   R, jac: ti.template(), use_jac: ti.template()):
    """Complex scatterer signal (I, Q) of sample s of ray r at voxel position pv / world x (mm):
    sum over the n_elev elevation planes of elev_w x the plane's scattering strength x
    :func:`scatterer_sum` (``strength``: that of the central plane). use_jac (static): the
    sums from :func:`_scatterer_sum_jac` (R: :func:`phasor_log_derivs`), each plane's
    Jacobian and strength also stored in jac[r, s, e] (else jac and R are not used)."""
    ci, cq = 0.0, 0.0
    for e in ti.static(range(n_elev)):
        st = strength
        off = elev_off[s, e]
        if ti.static(n_elev > 1):
            st = trilinear_value(props, pv + off * eyv[r], outside[None])[2]
        a, b = 0.0, 0.0
        if ti.static(use_jac):
            J = _scatterer_sum_jac(P, R, x + off * ey[r], rd[r], inv_cell_mm, k2h, seed)
            _store_jac(jac, r, s, e, J)
            jac[r, s, e][14] = st
            a, b = J[0], J[1]
        else:
            a, b = scatterer_sum(P, x + off * ey[r], rd[r], inv_cell_mm, k2h, seed)
        ci += elev_w[s, e] * st * a
        cq += elev_w[s, e] * st * b
    return ci, cq
