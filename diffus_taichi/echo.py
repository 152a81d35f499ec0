"""Echo physics along each ray (serial per ray, parallel over rays).

Every loop that carries state along a ray has a hand-written backward kernel registered with
``ti.ad.grad_replaced`` (Taichi's automatic one is silently wrong on Vulkan and needs
``ad_stack_size`` on CPU). Everything else here is a parallel, per-sample kernel whose automatic
gradient is correct on every backend.

Conventions: impedance z (MRayl), samples s = 0..S-1 along a ray, interface s between samples s and
s+1, pressure reflection for a wave travelling deeper r_s = (z[s+1]-z[s])/(z[s+1]+z[s]),
transmission 1+r_s going down and 1-r_s coming back up, so the round-trip pressure transmission
through interface s is 1 - r_s^2. Attenuation alpha (dB/cm/MHz) becomes an amplitude factor
exp(-alpha f d / 8.686) one way (d in cm, f in MHz).

Models (outputs ``echo`` = specular echo amplitude, ``gain`` = two-way amplitude factor that the
diffuse scattering at sample s sees; both (rays, samples)):
- ``primary``: echo_s = w_s r_s T_s A_s with T_s = prod_{j<s} (1 - r_j^2) and A_s the round-trip
  attenuation; one reflection per interface, no multiples.
- ``layered``: every sample boundary is an interface with all internal multiples, steady state
  (no travel time). The surface return d0 of the stack truncated after interface s is composed left
  to right with the Redheffer star product (state: R, R', P = T T'), O(S) per ray. Without travel
  time this reduces exactly to (z[s+1]-z[0])/(z[s+1]+z[0]); echo_s = (d0_s - d0_{s-1}) A_s.
- ``reverb``: time-resolved Goupillaud medium (each sample a layer of equal one-way travel time);
  down- and up-going waves scattered at every interface every time step, so multiples arrive
  later as reverberation; O(S^2) per ray. The trace at sample s is the surface signal at the
  round-trip time of interface s.
"""

import taichi as ti

NEPER_PER_DB = 1.0 / 8.685889638065035   # 20 / ln(10)


# --------------------------------------------------------------------------------------------
# shared per-sample kernels (automatic gradient is fine: no loop-carried state)
# --------------------------------------------------------------------------------------------
@ti.func
def refl(z0, z1):
    return (z1 - z0) / (z1 + z0)


@ti.kernel
def step_terms(z: ti.template(), alpha: ti.template(), np_per_dbcm_step: float,
               logt: ti.template(), att2: ti.template()):
    """logt[r,s] = ln(1 - r_s^2) - 2 a_s (round-trip log transmission of step s -> s+1);
    att2[r,s] = -2 a_s only (a_s = one-way attenuation in nepers over one step)."""
    for r, s in z:
        S = z.shape[1]
        a = alpha[r, s] * np_per_dbcm_step
        lt = 0.0
        if s < S - 1:
            rc = refl(z[r, s], z[r, s + 1])
            lt = ti.log(ti.max(1.0 - rc * rc, 1e-30))
        logt[r, s] = lt - 2.0 * a
        att2[r, s] = -2.0 * a


# --------------------------------------------------------------------------------------------
# exclusive cumulative sum along rays, with hand-written backward
# --------------------------------------------------------------------------------------------
@ti.kernel
def _cumsum_fwd(src: ti.template(), dst: ti.template()):
    for r in range(src.shape[0]):
        acc = 0.0
        for s in range(src.shape[1]):
            dst[r, s] = acc
            acc += src[r, s]


@ti.kernel
def _cumsum_bwd(src: ti.template(), dst: ti.template()):
    for r in range(src.shape[0]):
        acc = 0.0
        S = src.shape[1]
        for k in range(S):
            s = S - 1 - k
            src.grad[r, s] += acc
            acc += dst.grad[r, s]


@ti.ad.grad_replaced
def exclusive_cumsum(src, dst):
    """dst[r, s] = sum_{j < s} src[r, j]  (fields of shape (rays, samples))."""
    _cumsum_fwd(src, dst)


@ti.ad.grad_for(exclusive_cumsum)
def _exclusive_cumsum_grad(src, dst):
    _cumsum_bwd(src, dst)


# --------------------------------------------------------------------------------------------
# primary model
# --------------------------------------------------------------------------------------------
@ti.kernel
def primary_combine(z: ti.template(), cosw: ti.template(), cum: ti.template(),
                    echo: ti.template(), gain: ti.template()):
    """echo = w r T A, gain = T A = exp(cum) where cum is the exclusive cumsum of logt."""
    for r, s in z:
        S = z.shape[1]
        g = ti.exp(cum[r, s])
        e = 0.0
        if s < S - 1:
            w = ti.max(cosw[r, s], cosw[r, s + 1])
            e = w * refl(z[r, s], z[r, s + 1]) * g
        echo[r, s] = e
        gain[r, s] = g


# --------------------------------------------------------------------------------------------
# layered model: Redheffer star product, left to right
# --------------------------------------------------------------------------------------------
@ti.kernel
def _layered_fwd(z: ti.template(), ret: ti.template(), tr2: ti.template(),
                 sR: ti.template(), sRp: ti.template(), sP: ti.template()):
    """ret[r, s] = surface reflection of interfaces 0..s; tr2[r, s] = T T' through them.
    The state before interface s is stored in sR/sRp/sP for the backward pass."""
    for r in range(z.shape[0]):
        S = z.shape[1]
        R, Rp, P = 0.0, 0.0, 1.0
        for s in range(S - 1):
            sR[r, s], sRp[r, s], sP[r, s] = R, Rp, P
            rc = refl(z[r, s], z[r, s + 1])
            D = 1.0 - Rp * rc
            R, Rp, P = R + P * rc / D, -rc + (1.0 - rc * rc) * Rp / D, P * (1.0 - rc * rc) / (D * D)
            ret[r, s] = R
            tr2[r, s] = P
        ret[r, S - 1] = R
        tr2[r, S - 1] = P


@ti.kernel
def _layered_bwd(z: ti.template(), ret: ti.template(), tr2: ti.template(),
                 sR: ti.template(), sRp: ti.template(), sP: ti.template()):
    for r in range(z.shape[0]):
        S = z.shape[1]
        gR = ret.grad[r, S - 1]
        gRp = 0.0
        gP = tr2.grad[r, S - 1]
        for k in range(S - 1):
            s = S - 2 - k
            gR += ret.grad[r, s]
            gP += tr2.grad[r, s]
            Rp, P = sRp[r, s], sP[r, s]
            z0, z1 = z[r, s], z[r, s + 1]
            rc = refl(z0, z1)
            D = 1.0 - Rp * rc
            q = 1.0 - rc * rc
            # partial derivatives of (R', Rp', P') w.r.t. (R, Rp, P, rc); see module docstring
            dR_dRp = P * rc * rc / (D * D)
            dR_dP = rc / D
            dR_drc = P / (D * D)
            dRp_dRp = q / (D * D)
            dRp_drc = -1.0 - 2.0 * rc * Rp / D + q * Rp * Rp / (D * D)
            dP_dRp = 2.0 * P * q * rc / (D * D * D)
            dP_dP = q / (D * D)
            dP_drc = P * (-2.0 * rc / (D * D) + 2.0 * q * Rp / (D * D * D))
            g_rc = gR * dR_drc + gRp * dRp_drc + gP * dP_drc
            nRp = gR * dR_dRp + gRp * dRp_dRp + gP * dP_dRp
            nP = gR * dR_dP + gP * dP_dP
            gRp, gP = nRp, nP          # gR passes through unchanged (dR'/dR = 1)
            den = (z0 + z1) * (z0 + z1)
            z.grad[r, s] += g_rc * (-2.0 * z1 / den)
            z.grad[r, s + 1] += g_rc * (2.0 * z0 / den)


@ti.ad.grad_replaced
def layered_stack(z, ret, tr2, sR, sRp, sP):
    """Surface return ``ret`` and two-way transmission ``tr2`` of the truncated stacks."""
    _layered_fwd(z, ret, tr2, sR, sRp, sP)


@ti.ad.grad_for(layered_stack)
def _layered_stack_grad(z, ret, tr2, sR, sRp, sP):
    _layered_bwd(z, ret, tr2, sR, sRp, sP)


@ti.kernel
def layered_combine(ret: ti.template(), tr2: ti.template(), cumatt: ti.template(),
                    echo: ti.template(), gain: ti.template()):
    """echo_s = (d0_s - d0_{s-1}) A_s; gain_s = (T T')_{s-1} A_s."""
    for r, s in ret:
        a = ti.exp(cumatt[r, s])
        prev, t2 = 0.0, 1.0
        if s > 0:
            prev = ret[r, s - 1]
            t2 = tr2[r, s - 1]
        echo[r, s] = (ret[r, s] - prev) * a
        gain[r, s] = t2 * a


# --------------------------------------------------------------------------------------------
# reverb model: time-resolved Goupillaud layered medium
# --------------------------------------------------------------------------------------------
@ti.kernel
def reverb_fwd(z: ti.template(), alpha: ti.template(), np_per_dbcm_step: float,
               down: ti.template(), up: ti.template(), trace: ti.template()):
    """trace[r, s] = surface (layer 0) up-going pressure at time 2 s for a unit down-going pulse
    entering interface 0 at time 0. down/up (rays, samples) are scratch: amplitude arriving at
    interface i from above / below. One-way attenuation of layer i is applied on each crossing.
    No automatic or hand-written gradient: the reverb model is forward-only for now."""
    for r in range(z.shape[0]):
        S = z.shape[1]
        NI = S - 1
        for i in range(S):
            down[r, i] = 0.0
            up[r, i] = 0.0
            trace[r, i] = 0.0
        down[r, 0] = 1.0
        for t in range(2 * NI - 1):
            i0 = t % 2
            # only interfaces whose echo can still reach the surface before the last sample
            imax = ti.min(t, 2 * NI - 2 - t)
            i = i0
            while i <= imax and i < NI:
                a, b = down[r, i], up[r, i]
                rc = refl(z[r, i], z[r, i + 1])
                d_out = (1.0 + rc) * a - rc * b       # into layer i+1, travelling down
                u_out = rc * a + (1.0 - rc) * b       # into layer i, travelling up
                down[r, i] = 0.0
                up[r, i] = 0.0
                if i + 1 < NI:
                    down[r, i + 1] = d_out * ti.exp(-alpha[r, i + 1] * np_per_dbcm_step)
                if i == 0:
                    if t % 2 == 0:
                        trace[r, t // 2] = u_out
                else:
                    up[r, i - 1] = u_out * ti.exp(-alpha[r, i] * np_per_dbcm_step)
                i += 2


# --------------------------------------------------------------------------------------------
# NumPy-facing helpers (run the same kernels on given profiles; for checks and references)
# --------------------------------------------------------------------------------------------
def _profile_fields(z, name):
    import numpy as np

    from . import backend

    z = np.asarray(z, dtype=np.float64)
    if z.ndim == 1:
        z = z[None]
    if z.ndim != 2 or z.shape[1] < 2 or z.shape[0] < 1:
        raise ValueError(f"{name}: z must have shape (rays, N+1) with N >= 1, got {z.shape}")
    if not np.all(np.isfinite(z)) or np.any(z <= 0):
        raise ValueError(f"{name}: impedances must be finite and > 0")
    if backend.current()[0] is None:
        backend.init("cpu", "f64")
    prec = backend.current()[1]
    real = ti.f64 if prec == "f64" else ti.f32
    npreal = np.float64 if prec == "f64" else np.float32

    def field(a=None):
        f = ti.field(real, shape=z.shape)
        if a is not None:
            f.from_numpy(np.broadcast_to(np.asarray(a, dtype=np.float64), z.shape).astype(npreal))
        return f

    return z, field


def layered_returns(z):
    """Surface returns of layered stacks, computed by the Taichi star-product kernel.

    Args:
        z: (rays, N+1) impedances (any positive unit, e.g. MRayl), layer 0 = coupling medium.
    Returns:
        (rays, N) float64: d0[:, i] = pressure reflection seen from layer 0 of the stack made of
        interfaces 0..i (physical convention: +r for a wave going deeper, -r coming back).
        Runs on the current Taichi backend (CPU f64 if none is initialised).
    """
    z, field = _profile_fields(z, "layered_returns")
    zf = field(z)
    out = [field() for _ in range(5)]
    _layered_fwd(zf, *out)
    return out[0].to_numpy()[:, :-1].astype("float64")


def echo_profiles(z, model="primary", alpha=0.0, cosw=1.0, np_per_dbcm_step=0.0):
    """Run an echo model on given profiles (rays, samples): z (MRayl), alpha (dB/cm/MHz),
    cosw (incidence weight), np_per_dbcm_step = nepers per (dB/cm/MHz) per step
    (= f_MHz * step_cm / 8.686). Returns (echo, gain) as float64 (rays, samples)."""
    z, field = _profile_fields(z, "echo_profiles")
    zf, af, cf = field(z), field(alpha), field(cosw)
    logt, att2, cum, echo, gain = (field() for _ in range(5))
    step_terms(zf, af, np_per_dbcm_step, logt, att2)
    if model == "layered":
        ret, tr2, sR, sRp, sP = (field() for _ in range(5))
        _cumsum_fwd(att2, cum)
        _layered_fwd(zf, ret, tr2, sR, sRp, sP)
        layered_combine(ret, tr2, cum, echo, gain)
    elif model in ("primary", "reverb"):
        _cumsum_fwd(logt, cum)
        primary_combine(zf, cf, cum, echo, gain)
        if model == "reverb":
            down, up = field(), field()
            reverb_fwd(zf, af, np_per_dbcm_step, down, up, echo)
    else:
        raise ValueError(f"unknown echo model {model!r}")
    return echo.to_numpy().astype("float64"), gain.to_numpy().astype("float64")
