"""NumPy references for the benchmark (and as an independent check of the Taichi kernels).

* :func:`render_primary_numpy` / :class:`PrimaryNumpy`: a plain, vectorised NumPy (float64)
  re-implementation of ``Simulator``'s ``primary`` pipeline: tissue-table or transfer-function
  mapping per voxel (the acoustic-property volume, pose-independent, built once), rays from the
  pose, trilinear march with the analytic gradient of the impedance interpolant (incidence-angle
  weight), coherent tissue-fixed lattice scatterers as ``march.scatterer_sum`` (same uint32
  murmur hash, a and b from its byte pairs 0-1 and 2-3), lattice
  shift, SCAT_AMP, trilinear weights of the 8 cells and round-trip phases; the phases use a
  mirror of ``march.fast_cos_sin``/``cell_phasors``, not np.cos/np.sin, which differ by ~4e-6),
  ``elevation_planes`` 1 or 3 (``march.elevation_axes``, strength re-sampled on each plane),
  round-trip log transmission + exclusive cumsum, primary echo, complex RF (rf, rf_q), complex
  axial I/Q taps, lateral beam sum, envelope, ``speckle='mean'`` expected envelope (per-depth
  ``image.speckle_power_factor``), TGC + log compression and bilinear scan conversion. It reuses
  the package's *NumPy* helpers only (probe geometry, ``mapping.table_arrays``,
  ``image.axial_taps``, ``image.lateral_weights``, ``image.elevation_planes``,
  ``image.speckle_power_factor``, ``image.line_spacing_mm``, ``scan.scan_lookup``) and constants
  of ``march`` (LATTICE_SHIFT, SCAT_AMP), never a Taichi kernel.

  Agreement with the Taichi CPU float64 render (measured on the 2-core dev box, brain volume,
  craniotomy probe, 512x512 fan, default pose and a moved pose, default settings = coherent
  speckle, 1 elevation plane, cell 0.08 mm): max |fan_numpy - fan_taichi_f64| = 1.8e-12 at
  128x256 lines x samples (``bench_render.py --arch cpu --sizes 64x128,128x256``); at 64x128:
  transfer-function mapping 1.4e-12, elevation_planes=3 5.6e-12, speckle='mean' 1.5e-14,
  speckle off + custom TGC/seed/cell 2.4e-14. Per stage (32x64, f64): scatterers I and Q
  <= 3e-13, RF <= 9e-14, B-mode lines <= 4e-12, incidence cosine 2e-10. Against the Taichi
  float32 CPU render the difference is 9.0e-4 (64x128) and 1.5e-3 (128x256) with coherent
  speckle (99.9th percentile 2.9e-4, median 0): f32 rounding of the lattice coordinate
  (|x / cell| up to ~900 cells, f32 spacing 6e-5 cell, i.e. ~3e-4 rad of round-trip phase at
  k2h = 4.9 rad; |scat| differs by <= 2e-4 of <= 0.25) amplified by the log compression in
  the dark spots of the speckle; with speckle off or 'mean' the f32 difference is <= 1.4e-5.
  ``bench_render.py`` re-measures the f64 and f32 figures every run.

* :func:`prototype_dense_returns`: the prior prototype's algorithm for the layered (all internal
  multiples, steady state) surface returns: one dense 2(n+1)-unknown linear solve per depth n,
  O(N^4) per ray. It equals ``diffus_taichi.layered_returns`` (Redheffer star product, O(N)):
  measured max |dense - star| = 5.6e-15 on 200 random f64 profiles with N = 1..64 interfaces and
  impedances 0.5..8 MRayl (tolerance 1e-9; bench_render.py re-checks 48 profiles every run).

No Taichi kernel is called and Taichi is not initialised here (the package modules imported for
their NumPy helpers and constants do import taichi).
"""
from __future__ import annotations

import math

import numpy as np

from diffus_taichi import image, scan
from diffus_taichi.pose import Pose

from diffus_taichi.echo import NEPER_PER_DB   # noqa: E402  (constants only)
from diffus_taichi.image import DB_PER_NEPER  # noqa: E402
from diffus_taichi.march import LATTICE_SHIFT, SCAT_AMP, _COS_POLY_AT_HALF_PI  # noqa: E402


# ----------------------------------------------------------------------------------------------
# helpers mirroring the @ti.func's of rays.py and march.py
# ----------------------------------------------------------------------------------------------
def rodrigues(w) -> np.ndarray:
    """Same formula as ``rays.rodrigues`` (smooth at w = 0 through the 1e-20)."""
    w = np.asarray(w, dtype=np.float64)
    th = math.sqrt(float(w @ w) + 1e-20)
    k = w / th
    K = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + math.sin(th) * K + (1.0 - math.cos(th)) * (K @ K)


_U32 = np.uint32


def hash_u32(i, j, k, seed: int) -> np.ndarray:
    """the lattice hash of ``march.scatterer_sum`` (``march.HASH_MUL``, ``fmix_u32``) in uint32 arithmetic (wrap-around multiplies, logical shifts).
    i, j, k: int arrays (negative values wrap like Taichi's i32 -> u32 cast)."""
    iu = np.asarray(i).astype(np.int32).view(np.uint32)
    ju = np.asarray(j).astype(np.int32).view(np.uint32)
    ku = np.asarray(k).astype(np.int32).view(np.uint32)
    s = _U32((int(seed) & 0xFFFFFFFF) * 2654435761 & 0xFFFFFFFF)
    with np.errstate(over="ignore"):
        h = (iu * _U32(73856093)) ^ (ju * _U32(19349663)) ^ (ku * _U32(83492791)) ^ s
        h ^= h >> _U32(16)
        h *= _U32(0x85EBCA6B)
        h ^= h >> _U32(13)
        h *= _U32(0xC2B2AE35)
        h ^= h >> _U32(16)
    return h


def byte_pair(h: np.ndarray) -> np.ndarray:
    """``march._byte_pair``: zero-mean value of variance 1/2 from the two low bytes of h."""
    u = (h & _U32(0xFF)).astype(np.int64) + ((h >> _U32(8)) & _U32(0xFF)).astype(np.int64)
    return (u.astype(np.float64) - 255.0) * (1.7320508075688772 / 256.0)


def fast_cos_sin(t):
    """``march.fast_cos_sin`` (the same polynomial, operation for operation): (cos t, sin t)
    to ~4e-6. Mirrored rather than np.cos/np.sin so that f64 renders agree to rounding."""
    t = np.asarray(t, dtype=np.float64)
    n = np.floor(t * 0.15915494309189535 + 0.5)
    u = 0.5 * (t - n * 6.283185307179586)
    u2 = u * u
    sn = u * (1.0 - u2 / 6.0 * (1.0 - u2 / 20.0 * (1.0 - u2 / 42.0 * (1.0 - u2 / 72.0))))
    cs = 1.0 - u2 / 2.0 * (1.0 - u2 / 12.0 * (1.0 - u2 / 30.0 * (1.0 - u2 / 56.0 * (1.0 - u2 / 90.0))))
    cs = cs - _COS_POLY_AT_HALF_PI * u2 * 0.40528473456935109
    return cs * cs - sn * sn, 2.0 * sn * cs


def cell_phasors(d: np.ndarray, k2h: float) -> np.ndarray:
    """``march.cell_phasors`` for directions d (..., 3): (..., 8, 2), row 4a + 2b + c =
    [cos, sin] of -k2h (a dx + b dy + c dz)."""
    cx, sx = fast_cos_sin(-k2h * d[..., 0])
    cy, sy = fast_cos_sin(-k2h * d[..., 1])
    cz, sz = fast_cos_sin(-k2h * d[..., 2])
    cxy, sxy = cx * cy - sx * sy, cx * sy + sx * cy
    cxz, sxz = cx * cz - sx * sz, cx * sz + sx * cz
    cyz, syz = cy * cz - sy * sz, cy * sz + sy * cz
    cxyz, sxyz = cxy * cz - sxy * sz, cxy * sz + sxy * cz
    one, zero = np.ones_like(cx), np.zeros_like(cx)
    rows = [(one, zero), (cz, sz), (cy, sy), (cyz, syz), (cx, sx), (cxz, sxz), (cxy, sxy),
            (cxyz, sxyz)]
    return np.stack([np.stack(r, -1) for r in rows], -2)


def scatterer_sum(P: np.ndarray, x: np.ndarray, d: np.ndarray, inv_cell_mm: float, k2h: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``march.scatterer_sum``: complex sum (I, Q) of the tissue-fixed lattice scatterers of the
    8 cells around world points x (..., 3) mm seen along unit directions d (broadcast to x):
    sum_j w_j A_j exp(-i 2k (c_j - x).d), A_j = a_j + i b_j hashed per cell (a, b: byte pairs
    0-1 and 2-3 of ``hash_u32``), P = cell_phasors(d, k2h) (broadcast, (..., 8, 2))."""
    q = x * inv_cell_mm + np.asarray(LATTICE_SHIFT)
    f0 = np.floor(q)
    i0 = f0.astype(np.int64)
    f = q - f0
    d = np.broadcast_to(d, x.shape)
    bc, bs = fast_cos_sin(k2h * (f[..., 0] * d[..., 0] + f[..., 1] * d[..., 1]
                                 + f[..., 2] * d[..., 2]))
    P = np.broadcast_to(P, x.shape[:-1] + (8, 2))
    ai = np.zeros(x.shape[:-1])
    aq = np.zeros(x.shape[:-1])
    for a in (0, 1):
        wa = f[..., 0] if a else 1.0 - f[..., 0]
        for b in (0, 1):
            wb = f[..., 1] if b else 1.0 - f[..., 1]
            for c in (0, 1):
                wc = f[..., 2] if c else 1.0 - f[..., 2]
                w = wa * wb * wc
                h = hash_u32(i0[..., 0] + a, i0[..., 1] + b, i0[..., 2] + c, seed)
                sa = w * byte_pair(h)
                sb = w * byte_pair(h >> _U32(16))
                n = 4 * a + 2 * b + c
                if n == 0:
                    ai += sa
                    aq += sb
                else:
                    pr, pi = P[..., n, 0], P[..., n, 1]
                    ai += sa * pr - sb * pi
                    aq += sa * pi + sb * pr
    return SCAT_AMP * (ai * bc - aq * bs), SCAT_AMP * (ai * bs + aq * bc)


def elevation_axes(ro: np.ndarray, rd: np.ndarray, M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``march.elevation_axes``: unit elevation axis per ray (world) and the same vector in voxel
    index units (M: the 3x3 linear part of world_to_voxel)."""
    R = ro.shape[0]
    r = np.arange(R)
    r1, r2 = np.maximum(r - 1, 0), np.minimum(r + 1, R - 1)
    t = (ro[r2] - ro[r1]) + (rd[r2] - rd[r1])
    e = np.cross(rd, t)
    e = e / np.sqrt(np.sum(e * e, -1, keepdims=True) + 1e-30)
    return e, e @ M.T


# ----------------------------------------------------------------------------------------------
# primary model
# ----------------------------------------------------------------------------------------------
def acoustic_volume(volume, mapping) -> np.ndarray:
    """(X, Y, Z, 3) float64 [Z MRayl, alpha dB/cm/MHz, scattering] per voxel, as
    ``march.acoustic_volume``: tissue table p_bg + sum_c f_c (p_c - p_bg), or the transfer
    function of the intensity channel."""
    rows, chan, _ = mapping.table_arrays(volume)
    rows = np.asarray(rows, dtype=np.float64)
    ch = volume.channels
    if mapping.kind == "transfer":
        props, _ = tf_eval(np.asarray(mapping.knots, np.float64),
                           ch[..., volume.intensity_index].astype(np.float64))
        return props
    bg = rows[0]
    props = np.empty(volume.shape + (3,))
    props[...] = bg
    for c in range(volume.n_channels):
        if chan[c] >= 0:
            props += ch[..., c, None].astype(np.float64) * (rows[chan[c]] - bg)
    return props


def outside_props(mapping, volume) -> np.ndarray:
    """(3,) properties assumed beyond the grid (the Simulator's ``outside`` field)."""
    if mapping.kind == "transfer":
        return np.asarray(mapping.knots, np.float64)[0]
    return np.asarray(mapping.table_arrays(volume)[0], np.float64)[0]


def tf_eval(tf: np.ndarray, v: np.ndarray):
    """``march.tf_eval``: piecewise-linear transfer function, K uniform knots on [0, 1];
    value (..., 3) and slope (..., 3)."""
    K = tf.shape[0]
    x = np.clip(v, 0.0, 1.0) * (K - 1)
    i = np.minimum(np.floor(x).astype(np.int64), K - 2)
    f = (x - i)[..., None]
    lo, hi = tf[i], tf[i + 1]
    slope = np.where(((v < 0.0) | (v > 1.0))[..., None], 0.0, (hi - lo) * (K - 1))
    return lo + f * (hi - lo), slope


class PrimaryNumpy:
    """Precomputed (pose-independent) state + :meth:`render`. Mirrors ``Simulator.__init__``:
    everything that depends only on volume/probe/mapping/settings (the acoustic-property
    volume, taps, lateral weights, scan-conversion table) is prepared once, outside the
    per-frame path, exactly as the Simulator does."""

    def __init__(self, volume, probe, mapping, settings, tgc_db_per_cm=None):
        self.volume, self.probe, self.mapping, self.settings = volume, probe, mapping, settings
        if tgc_db_per_cm is None:
            tgc_db_per_cm = getattr(settings, "tgc_db_per_cm", None)
        if tgc_db_per_cm is None:                  # Simulator.tgc_db_per_cm default
            tgc_db_per_cm = 1.2 * probe.frequency_mhz
        self.tgc_db_per_cm = float(tgc_db_per_cm)
        # property volume padded by one voxel of the 'outside' properties: an index clipped
        # into [-1, dim] then reads 'outside' exactly where march.fetch does
        X, Y, Z = volume.shape
        padded = np.empty((X + 2, Y + 2, Z + 2, 3))
        padded[...] = outside_props(mapping, volume)
        padded[1:-1, 1:-1, 1:-1] = acoustic_volume(volume, mapping)
        self.pdims = np.array([X + 2, Y + 2, Z + 2])
        self.vox = padded.reshape(-1, 3)
        A = volume.world_to_voxel
        self.M, self.b, self.gradT = A[:3, :3], A[:3, 3], A[:3, :3].T
        self.line_o, self.line_d = probe.line_geometry()
        ti_, tq = image.axial_taps(probe)
        self.taps_i, self.taps_q = ti_, tq
        self.K = (len(ti_) - 1) // 2
        self.lat_w = image.lateral_weights(probe)            # (S, 2M+1)
        self.Mlat = (self.lat_w.shape[1] - 1) // 2
        base, frac = scan.scan_lookup(probe)
        inside = base[..., 0] >= 0
        self.sc_inside = inside
        self.sc_l = base[..., 0][inside].astype(np.intp)
        self.sc_s = base[..., 1][inside].astype(np.intp)
        self.sc_fl = frac[..., 0][inside]
        self.sc_fs = frac[..., 1][inside]
        self.depth = probe.sample_depths_mm()                 # s * step_mm
        # coherent scatterers (Simulator._alloc_imaging / _k2h)
        sp = getattr(settings, "speckle", True)
        self.speckle_mode = {True: "coherent", False: "off"}.get(sp, sp)
        if self.speckle_mode not in ("coherent", "mean", "off"):
            raise ValueError(f"speckle must be True/'coherent', 'mean' or False/'off', got {sp!r}")
        self.n_elev = int(getattr(settings, "elevation_planes", 1))
        self.elev_off, self.elev_w = image.elevation_planes(probe, self.n_elev)
        self.inv_cell_mm = 1.0 / settings.noise_cell_mm
        self.k2h = 4.0 * np.pi / probe.wavelength_mm * settings.noise_cell_mm
        self.speckle_c = np.broadcast_to(np.asarray(image.speckle_power_factor(
            ti_, tq, self.lat_w, probe.sample_spacing_mm, settings.noise_cell_mm, self.elev_w,
            image.line_spacing_mm(probe)), dtype=np.float64), (probe.n_samples,))

    @classmethod
    def from_simulator(cls, sim) -> "PrimaryNumpy":
        return cls(sim.volume, sim.probe, sim.mapping, sim.settings,
                   tgc_db_per_cm=getattr(sim, "tgc_db_per_cm", None))

    # --- stages -------------------------------------------------------------------------------
    def rays(self, pose):
        v = pose.as_vector()
        R = rodrigues(v[3:])
        ro = self.line_o @ R.T + v[:3]
        rd = self.line_d @ R.T
        vo = ro @ self.M.T + self.b
        vd = rd @ self.M.T
        return ro, rd, vo, vd

    def trilinear_with_grad(self, p):
        """Properties (..., 3) and the index-space gradient (..., 3) of the impedance (channel 0)
        of the trilinear interpolant at voxel positions p (..., 3)."""
        f0 = np.floor(p)
        i0 = f0.astype(np.int64) + 1                           # +1: padded grid
        f = p - f0
        val = np.zeros(p.shape[:-1] + (3,))
        grad = np.zeros(p.shape[:-1] + (3,))
        X, Y, Z = self.pdims
        fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
        for a in (0, 1):
            ii = np.clip(i0[..., 0] + a, 0, X - 1)
            wx, dx = (fx, 1.0) if a else (1.0 - fx, -1.0)
            for b in (0, 1):
                jj = np.clip(i0[..., 1] + b, 0, Y - 1)
                wy, dy = (fy, 1.0) if b else (1.0 - fy, -1.0)
                for c in (0, 1):
                    kk = np.clip(i0[..., 2] + c, 0, Z - 1)
                    wz, dz = (fz, 1.0) if c else (1.0 - fz, -1.0)
                    v = self.vox[(ii * Y + jj) * Z + kk]
                    val += (wx * wy * wz)[..., None] * v
                    z0 = v[..., 0]
                    grad[..., 0] += (dx * wy * wz) * z0
                    grad[..., 1] += (wx * dy * wz) * z0
                    grad[..., 2] += (wx * wy * dz) * z0
        return val, grad

    def march(self, ro, rd, vo, vd):
        """z, alpha, scat, scat_q, cosw (lines, samples), as march.march: with coherent speckle
        (scat, scat_q) = sum over the elevation planes of elev_w x the plane's scattering
        strength x :func:`scatterer_sum`; otherwise scat = the strength alone, scat_q = 0."""
        d = self.depth
        p = vo[:, None, :] + d[None, :, None] * vd[:, None, :]
        prop, gidx = self.trilinear_with_grad(p)
        g = gidx @ self.gradT.T                                # dZ / d world mm
        cosw = np.abs(np.einsum("rsk,rk->rs", g, rd)) / np.sqrt(np.einsum("rsk,rsk->rs", g, g) + 1e-12)
        if self.speckle_mode != "coherent":
            return prop[..., 0], prop[..., 1], prop[..., 2], np.zeros_like(cosw), cosw
        st = self.settings
        xw = ro[:, None, :] + d[None, :, None] * rd[:, None, :]
        P = cell_phasors(rd, self.k2h)[:, None]                # (R, 1, 8, 2)
        rdb = rd[:, None, :]
        if self.n_elev == 1:   # elev_off = 0, elev_w = 1 (as march.march with n_elev = 1)
            a, b = scatterer_sum(P, xw, rdb, self.inv_cell_mm, self.k2h, int(st.seed))
            return prop[..., 0], prop[..., 1], prop[..., 2] * a, prop[..., 2] * b, cosw
        ey, eyv = elevation_axes(ro, rd, self.M)
        ci, cq = np.zeros_like(cosw), np.zeros_like(cosw)
        for e in range(self.n_elev):
            off = self.elev_off[:, e][None, :, None]          # (1, S, 1)
            strength = self.trilinear_with_grad(p + off * eyv[:, None, :])[0][..., 2]
            a, b = scatterer_sum(P, xw + off * ey[:, None, :], rdb, self.inv_cell_mm, self.k2h,
                                 int(st.seed))
            w = self.elev_w[:, e][None, :]
            ci += w * strength * a
            cq += w * strength * b
        return prop[..., 0], prop[..., 1], ci, cq, cosw

    def echo_primary(self, z, alpha, cosw):
        """echo = w r T A and gain = T A (echo.step_terms + exclusive_cumsum + primary_combine)."""
        p = self.probe
        np_step = NEPER_PER_DB * p.frequency_mhz * p.sample_spacing_mm / 10.0
        rc = (z[:, 1:] - z[:, :-1]) / (z[:, 1:] + z[:, :-1])
        logt = -2.0 * alpha * np_step
        logt[:, :-1] += np.log(np.maximum(1.0 - rc * rc, 1e-30))
        cum = np.zeros_like(logt)
        np.cumsum(logt[:, :-1], axis=1, out=cum[:, 1:])
        gain = np.exp(cum)
        echo = np.zeros_like(z)
        echo[:, :-1] = np.maximum(cosw[:, :-1], cosw[:, 1:]) * rc * gain[:, :-1]
        return echo, gain

    def image(self, rf, rf_q=None, mean_extra=None):
        """Complex axial I/Q (rf + i rf_q; rf_q None: real RF), lateral beam sum + envelope
        (with ``mean_extra`` = (gain, strength): speckle='mean' expected envelope
        sqrt(env^2 + c[s] (gain strength)^2)), TGC/log compression -> bmode (lines, samples)."""
        R, S = rf.shape
        K, M = self.K, self.Mlat
        pad = np.zeros((R, S + 2 * K))
        pad[:, K:K + S] = rf
        if rf_q is not None:
            padq = np.zeros((R, S + 2 * K))
            padq[:, K:K + S] = rf_q
        iq_i, iq_q = np.zeros_like(rf), np.zeros_like(rf)
        for k in range(-K, K + 1):                     # iq[s] = sum_k taps[k] rf[s - k]
            v = pad[:, K - k:K - k + S]
            iq_i += self.taps_i[k + K] * v
            iq_q += self.taps_q[k + K] * v
            if rf_q is not None:                       # complex taps x complex RF
                vq = padq[:, K - k:K - k + S]
                iq_i -= self.taps_q[k + K] * vq
                iq_q += self.taps_i[k + K] * vq
        pi = np.zeros((R + 2 * M, S))
        pq = np.zeros((R + 2 * M, S))
        pi[M:M + R], pq[M:M + R] = iq_i, iq_q
        ai, aq = np.zeros_like(rf), np.zeros_like(rf)
        for m in range(-M, M + 1):                     # sum_m w[s, m] iq[r + m, s]
            w = self.lat_w[:, m + M]
            ai += w * pi[M + m:M + m + R]
            aq += w * pq[M + m:M + m + R]
        env = np.sqrt(ai * ai + aq * aq + 1e-24)
        if mean_extra is not None:
            gain, strength = mean_extra
            dd = gain * strength
            env = np.sqrt(env * env + self.speckle_c[None, :] * dd * dd)
        st, p = self.settings, self.probe
        tgc = self.tgc_db_per_cm * p.sample_spacing_mm / 10.0
        db = DB_PER_NEPER * np.log(env) + st.gain_db + tgc * np.arange(S)
        return np.clip((db + st.dynamic_range_db) / st.dynamic_range_db, 0.0, 1.0)

    def scan_convert(self, bmode):
        l, s, fl, fs = self.sc_l, self.sc_s, self.sc_fl, self.sc_fs
        b00, b01 = bmode[l, s], bmode[l, s + 1]
        b10, b11 = bmode[l + 1, s], bmode[l + 1, s + 1]
        v0 = b00 + fs * (b01 - b00)
        v1 = b10 + fs * (b11 - b10)
        fan = np.zeros(self.sc_inside.shape)
        fan[self.sc_inside] = v0 + fl * (v1 - v0)
        return fan

    # --- whole pipeline -----------------------------------------------------------------------
    def render(self, pose=None, stages: bool = False):
        """Fan image (H, W) float64 for ``pose`` (Pose, 6-vector or None = default pose).
        With ``stages=True`` also return a dict of the intermediate arrays."""
        if pose is None:
            pose = self.volume.default_pose
        if not isinstance(pose, Pose):
            pose = Pose.from_vector(pose)
        ro, rd, vo, vd = self.rays(pose)
        z, alpha, scat, scat_q, cosw = self.march(ro, rd, vo, vd)
        echo, gain = self.echo_primary(z, alpha, cosw)
        mode = self.speckle_mode
        if mode == "coherent":
            rf, rf_q = echo + gain * scat, gain * scat_q
            bmode = self.image(rf, rf_q)
        else:                  # 'off' and 'mean': the specular echo alone through the pulse
            rf, rf_q = echo.copy(), np.zeros_like(echo)
            bmode = self.image(rf, None, (gain, scat) if mode == "mean" else None)
        fan = self.scan_convert(bmode)
        if stages:
            return fan, {"impedance_MRayl": z, "attenuation_dB_cm_MHz": alpha, "scatterers": scat,
                         "scatterers_q": scat_q, "incidence_cos": cosw, "echo": echo,
                         "two_way_gain": gain, "rf": rf, "rf_q": rf_q,
                         "bmode_lines": bmode, "fan": fan}
        return fan


def render_primary_numpy(sim, pose=None) -> np.ndarray:
    """NumPy float64 fan image of the ``primary`` model for ``sim``'s volume, probe, mapping and
    settings (the Taichi fields of ``sim`` are not used). The pose-independent set-up is cached
    on the simulator object, as the Simulator itself does at construction."""
    ref = getattr(sim, "_numpy_primary_ref", None)
    if ref is None or ref.probe is not sim.probe or ref.mapping is not sim.mapping:
        ref = PrimaryNumpy.from_simulator(sim)
        sim._numpy_primary_ref = ref
    return ref.render(pose)


# ----------------------------------------------------------------------------------------------
# prior prototype: dense linear solve per depth
# ----------------------------------------------------------------------------------------------
def dense_interface_system(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense system A x = rhs for the steady-state field in a stack of layers z[0..n].

    Unknowns x = [a_0, b_0, a_1, b_1, ..., a_n, b_n]: down-going (a) and up-going (b) pressure
    amplitudes in each layer (2(n+1) unknowns). Equations:
      a_0 = 1                                       (unit incident wave in layer 0)
      a_i + b_i = a_{i+1} + b_{i+1}                 (pressure continuity at interface i)
      (a_i - b_i) / z_i = (a_{i+1} - b_{i+1}) / z_{i+1}   (normal flux / particle velocity)
      b_n = 0                                       (nothing comes back from the last layer)
    Eliminating one interface gives r = (z_{i+1}-z_i)/(z_{i+1}+z_i) for a wave from the left and
    the physical -r (not the prototype's +r) for a wave from the right.
    """
    n = len(z) - 1
    m = 2 * (n + 1)
    A = np.zeros((m, m))
    rhs = np.zeros(m)
    A[0, 0] = 1.0
    rhs[0] = 1.0
    for i in range(n):
        row = 1 + 2 * i
        A[row, 2 * i], A[row, 2 * i + 1] = 1.0, 1.0
        A[row, 2 * i + 2], A[row, 2 * i + 3] = -1.0, -1.0
        yi, yj = 1.0 / z[i], 1.0 / z[i + 1]
        A[row + 1, 2 * i], A[row + 1, 2 * i + 1] = yi, -yi
        A[row + 1, 2 * i + 2], A[row + 1, 2 * i + 3] = -yj, yj
    A[m - 1, m - 1] = 1.0
    return A, rhs


def prototype_dense_returns(z) -> np.ndarray:
    """Surface returns of one ray by the prototype's method: for every depth n = 1..N build and
    solve (``np.linalg.solve``) the dense 2(n+1)-unknown interface system of layers z[0..n] and
    keep b_0. O(N^4) per ray (N solves of up to 2(N+1) unknowns).

    Args:
        z: (N+1,) positive impedances, layer 0 = coupling medium.
    Returns:
        (N,) float64; element n-1 equals ``layered_returns(z)[0, n-1]`` (star product).
    """
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    if z.size < 2 or not np.all(np.isfinite(z)) or np.any(z <= 0):
        raise ValueError("prototype_dense_returns: need >= 2 finite positive impedances")
    N = z.size - 1
    out = np.empty(N)
    for n in range(1, N + 1):
        A, rhs = dense_interface_system(z[: n + 1])
        out[n - 1] = np.linalg.solve(A, rhs)[1]
    return out
