"""Acoustic-property volume (mapping applied per voxel) and the march: trilinear sampling of
it along every ray, with tissue-fixed scatterer amplitudes.

Per sample (r, s) it writes, all with shape (n_lines, n_samples):
  z      acoustic impedance minus echo.Z_REF (MRayl; deviations keep f32 precision)
  alpha  attenuation (dB/cm/MHz)
  scat   scatterer amplitude = scattering strength x tissue-fixed random value (dimensionless)
  cosw   |cos| of the angle between the ray and the impedance-gradient normal (0..1)
Outside the volume the background tissue (coupling water) is assumed.
"""

import taichi as ti

from .echo import Z_REF


@ti.func
def fetch(vol: ti.template(), i, j, k, outside):
    """Voxel (i, j, k) of a vector field, ``outside`` beyond the grid."""
    v = outside
    if 0 <= i < vol.shape[0] and 0 <= j < vol.shape[1] and 0 <= k < vol.shape[2]:
        v = ti.cast(vol[i, j, k], float)
    return v


@ti.func
def trilinear(vol: ti.template(), p, outside):
    """Trilinear value (C,) at voxel position p, and the index-space gradient (3,) of
    channel 0."""
    f0 = ti.floor(p)
    i, j, k = ti.cast(f0[0], ti.i32), ti.cast(f0[1], ti.i32), ti.cast(f0[2], ti.i32)
    fx, fy, fz = p[0] - f0[0], p[1] - f0[1], p[2] - f0[2]
    c000, c100 = fetch(vol, i, j, k, outside), fetch(vol, i + 1, j, k, outside)
    c010, c110 = fetch(vol, i, j + 1, k, outside), fetch(vol, i + 1, j + 1, k, outside)
    c001, c101 = fetch(vol, i, j, k + 1, outside), fetch(vol, i + 1, j, k + 1, outside)
    c011, c111 = fetch(vol, i, j + 1, k + 1, outside), fetch(vol, i + 1, j + 1, k + 1, outside)
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
def hash_u32(i, j, k, seed):
    """Integer hash of a lattice point (murmur3 finaliser)."""
    h = (ti.cast(i, ti.u32) * ti.u32(73856093)) ^ (ti.cast(j, ti.u32) * ti.u32(19349663)) \
        ^ (ti.cast(k, ti.u32) * ti.u32(83492791)) ^ (ti.cast(seed, ti.u32) * ti.u32(2654435761))
    h ^= h >> ti.u32(16)
    h *= ti.u32(0x85EBCA6B)
    h ^= h >> ti.u32(13)
    h *= ti.u32(0xC2B2AE35)
    h ^= h >> ti.u32(16)
    return h


@ti.func
def lattice_value(i, j, k, seed):
    """Zero-mean, unit-variance random value (triangular) attached to lattice point (i, j, k)."""
    h = hash_u32(i, j, k, seed)
    u1 = ti.cast(h & ti.u32(0xFFFF), float) / 65536.0
    u2 = ti.cast(h >> ti.u32(16), float) / 65536.0
    return (u1 + u2 - 1.0) * 2.449489742783178  # sqrt(6): unit variance


@ti.func
def tissue_noise(x, cell_mm, seed):
    """Value noise fixed in tissue: trilinear interpolation of lattice values at world x (mm)."""
    q = x / cell_mm
    f0 = ti.floor(q)
    i, j, k = ti.cast(f0[0], ti.i32), ti.cast(f0[1], ti.i32), ti.cast(f0[2], ti.i32)
    f = q - f0
    acc = 0.0
    for a, b, c in ti.static(ti.ndrange(2, 2, 2)):
        w = (f[0] if a else 1.0 - f[0]) * (f[1] if b else 1.0 - f[1]) * (f[2] if c else 1.0 - f[2])
        acc += w * lattice_value(i + a, j + b, k + c, seed)
    return acc


@ti.kernel
def acoustic_volume(vol: ti.template(), table: ti.template(), chan_tissue: ti.template(),
                    tf: ti.template(), tf_chan: ti.template(), props: ti.template()):
    """Per voxel: channels (C,) -> [Z - Z_REF (MRayl), alpha dB/cm/MHz, scattering] (3,).

    table (T, 3) rows with row 0 the background tissue; chan_tissue (C,) row per channel or -1;
    tf (K, 3) transfer-function knots, used instead of the table when tf_chan >= 0 (static)."""
    for I in ti.grouped(vol):
        ch = ti.cast(vol[I], float)
        prop = ti.Vector.zero(float, 3)
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
            for c in ti.static(range(vol.n)):
                t = chan_tissue[c]
                if t >= 0:
                    prop += ch[c] * (ti.Vector([table[t, 0], table[t, 1], table[t, 2]])
                                     - ti.Vector([table[0, 0], table[0, 1], table[0, 2]]))
        props[I] = prop


@ti.kernel
def march(props: ti.template(), outside: ti.template(), vo: ti.template(), vd: ti.template(),
          ro: ti.template(), rd: ti.template(), gradT: ti.template(), step_mm: float,
          noise_cell_mm: float, seed: ti.i32, noise_on: ti.template(),
          z: ti.template(), alpha: ti.template(), scat: ti.template(), cosw: ti.template()):
    """Sample the acoustic-property volume at every (ray, sample).

    props (X, Y, Z) vec3 [MRayl, dB/cm/MHz, scattering]; outside () vec3 the background
    properties beyond the grid; gradT () 3x3 maps index-space gradients to world-mm gradients.
    noise_on (static): scat = strength x tissue-fixed random value, else the strength alone.
    """
    for r in range(z.shape[0]):          # rays in parallel, samples serial: the backward pass
        for s in range(z.shape[1]):      # accumulates ro/rd.grad[r] without contention
            d_mm = s * step_mm
            prop, gidx = trilinear(props, vo[r] + d_mm * vd[r], outside[None])
            g = gradT[None] @ gidx                                      # dZ / d world mm
            cosw[r, s] = ti.abs(g.dot(rd[r])) / ti.sqrt(g.dot(g) + 1e-12)
            z[r, s] = prop[0]
            alpha[r, s] = prop[1]
            if ti.static(noise_on):
                scat[r, s] = prop[2] * tissue_noise(ro[r] + d_mm * rd[r], noise_cell_mm, seed)
            else:   # scattering strength only (expected-intensity image formation)
                scat[r, s] = prop[2]
