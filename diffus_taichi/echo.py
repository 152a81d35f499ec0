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
# Impedance fields hold Z - Z_REF (MRayl): consecutive soft-tissue impedances differ by ~1e-4
# MRayl, and their difference in f32 keeps 16x more digits when taken between deviations of
# ~0.1 than between absolute values of ~1.6.
Z_REF = 1.5


# --------------------------------------------------------------------------------------------
# shared per-sample kernels (automatic gradient is fine: no loop-carried state)
# --------------------------------------------------------------------------------------------
@ti.func
def refl(z0, z1):
    """Pressure reflection from deviations z = Z - Z_REF."""
    return (z1 - z0) / (z1 + z0 + 2.0 * Z_REF)


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
            den = (z0 + z1 + 2.0 * Z_REF) * (z0 + z1 + 2.0 * Z_REF)
            z.grad[r, s] += g_rc * (-2.0 * (z1 + Z_REF) / den)
            z.grad[r, s + 1] += g_rc * (2.0 * (z0 + Z_REF) / den)


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
# reverb model: time-resolved Goupillaud layered medium, with hand-written checkpointed backward
# --------------------------------------------------------------------------------------------
# Wave state. Interface i (between samples i and i+1, i = 0..NI-1, NI = S-1) is processed at the
# time steps t = i, i+2, ...; at step t it reads the amplitude a arriving from above (down[i]) and
# b arriving from below (up[i]), sends d = (1+r_i) a - r_i b into layer i+1 (attenuated by e_{i+1})
# and u = r_i a + (1-r_i) b into layer i (attenuated by e_i; at i = 0 it is the trace sample t/2),
# with e_j = exp(-alpha_j np_per_dbcm_step). Only the interfaces of the parity of t are active, so
# the state lives in one packed array per ray: at step t, w[i] = down[i] and w[i+1] = up[i] for
# every active i (i = t mod 2, t mod 2 + 2, ...). Processing i maps the disjoint pair
# (w[i], w[i+1]) in place to (up[i-1], down[i+1]), which are exactly the slots of interfaces i-1
# and i+1 at step t+1 (w[0] := 0 at i = 0 since nothing feeds down[0] again; w[NI] := 0 since the
# last layer is a half-space). Interfaces i > imax(t) = min(t, 2 NI - 2 - t) are skipped: nothing
# has reached them yet, or their echo could not return before the last trace sample.
#
# Backward: the step is linear in (a, b), so its adjoint needs the per-step inputs. The forward
# stores w every C steps (checkpoints); the backward walks the segments last to first, restores
# the checkpoint, recomputes the C steps storing each step's packed inputs, then runs the adjoint
# of those steps in reverse time (adjoint of the in-place pair update: (ga, gb) = M^T (gu', gd')).
# Memory per ray: S (w) + S (rc) + S (e) + ceil(T / C) S (checkpoints) + C S (segment inputs)
# + 3 S (adjoint scratch), T = 2 S - 3 time steps; C = ceil(sqrt(T)) by default.
@ti.func
def _rv_active(t, NI):
    """First active interface at step t and the number of active interfaces (i0, i0+2, ...)."""
    i0 = t % 2
    imax = ti.min(ti.min(t, 2 * NI - 2 - t), NI - 1)
    return i0, ti.max(imax - i0, -2) // 2 + 1


@ti.func
def _rv_step(w, rcf, ef, trace, seg, r, t, NI, k, recompute: ti.template()):
    """Advance the packed state of ray r over time step t (forward), or, with ``recompute``,
    store the step's inputs in seg[r, k, :] instead of writing the trace."""
    i0, n = _rv_active(t, NI)
    for j in range(n):
        i = i0 + 2 * j
        a, b = w[r, i], w[r, i + 1]
        if ti.static(recompute):
            seg[r, k, i] = a
            seg[r, k, i + 1] = b
        rc = rcf[r, i]
        d_out = (1.0 + rc) * a - rc * b       # into layer i+1, travelling down
        u_out = rc * a + (1.0 - rc) * b       # into layer i, travelling up
        dn = 0.0
        if i + 1 < NI:
            dn = d_out * ef[r, i + 1]
        w[r, i + 1] = dn
        if i == 0:
            if ti.static(not recompute):
                trace[r, t // 2] = u_out
            w[r, 0] = 0.0
        else:
            w[r, i] = u_out * ef[r, i]


@ti.kernel
def reverb_fwd(z: ti.template(), alpha: ti.template(), np_per_dbcm_step: float,
               w: ti.template(), rcf: ti.template(), ef: ti.template(), ck: ti.template(),
               trace: ti.template(), save: ti.template()):
    """trace[r, s] = surface (layer 0) up-going pressure at time 2 s for a unit down-going pulse
    entering interface 0 at time 0 (trace[r, S-1] = 0). One-way attenuation of layer i is applied
    on each crossing. Scratch: w (packed wave state), rcf/ef (reflection coefficient of each
    interface, one-way attenuation factor of each layer); with ``save`` the state at the start of
    every step t = k C is copied to ck[r, k, :] (C = ceil(T / ck.shape[1]) steps, T = 2 S - 3)
    for the backward pass. Use :func:`reverb_trace` (differentiable) rather than this kernel."""
    for r, s in z:
        S = z.shape[1]
        rc = 0.0
        if s < S - 1:
            rc = refl(z[r, s], z[r, s + 1])
        rcf[r, s] = rc
        ef[r, s] = ti.exp(-alpha[r, s] * np_per_dbcm_step)
    for r in range(z.shape[0]):
        S = z.shape[1]
        NI = S - 1
        T = 2 * NI - 1
        for i in range(S):
            w[r, i] = 0.0
            trace[r, i] = 0.0
        w[r, 0] = 1.0
        for t in range(T):
            if ti.static(save):
                C = (T + ck.shape[1] - 1) // ck.shape[1]
                if t % C == 0:
                    k = t // C
                    for i in range(S):
                        ck[r, k, i] = w[r, i]
            _rv_step(w, rcf, ef, trace, trace, r, t, NI, 0, False)


@ti.kernel
def reverb_bwd(z: ti.template(), alpha: ti.template(), np_per_dbcm_step: float,
               w: ti.template(), rcf: ti.template(), ef: ti.template(), ck: ti.template(),
               seg: ti.template(), gw: ti.template(), grc: ti.template(), ge: ti.template(),
               trace: ti.template()):
    """Adds d(sum trace.grad * trace)/dz to z.grad and .../dalpha to alpha.grad (see the section
    comment); needs the checkpoints of a ``save`` forward run with the same z and alpha."""
    for r in range(z.shape[0]):
        S = z.shape[1]
        NI = S - 1
        T = 2 * NI - 1
        NK = ck.shape[1]
        C = (T + NK - 1) // NK                    # steps per segment (<= seg.shape[1])
        for i in range(S):
            gw[r, i] = 0.0
            grc[r, i] = 0.0
            ge[r, i] = 0.0
        for kk in range(NK):
            kseg = NK - 1 - kk
            t0 = kseg * C
            nt = ti.max(ti.min(C, T - t0), 0)
            for i in range(S):
                w[r, i] = ck[r, kseg, i]
            for k in range(nt):                   # recompute the segment, keep each step's inputs
                _rv_step(w, rcf, ef, trace, seg, r, t0 + k, NI, k, True)
            for kt in range(nt):                  # adjoint, reverse time
                k = nt - 1 - kt
                t = t0 + k
                i0, n = _rv_active(t, NI)
                for j in range(n):
                    i = i0 + 2 * j
                    a, b = seg[r, k, i], seg[r, k, i + 1]
                    rc = rcf[r, i]
                    gd = 0.0
                    if i + 1 < NI:
                        e1 = ef[r, i + 1]
                        gdn = gw[r, i + 1]
                        gd = gdn * e1
                        ge[r, i + 1] = ge[r, i + 1] + gdn * ((1.0 + rc) * a - rc * b)
                    gu = 0.0
                    if i == 0:
                        gu = trace.grad[r, t // 2]
                    else:
                        e0 = ef[r, i]
                        gup = gw[r, i]
                        gu = gup * e0
                        ge[r, i] = ge[r, i] + gup * (rc * a + (1.0 - rc) * b)
                    gw[r, i] = (1.0 + rc) * gd + rc * gu
                    gw[r, i + 1] = (1.0 - rc) * gu - rc * gd
                    grc[r, i] = grc[r, i] + (gd + gu) * (a - b)
    for r, s in z:
        S = z.shape[1]
        alpha.grad[r, s] += -np_per_dbcm_step * ef[r, s] * ge[r, s]
        if s < S - 1:
            z0, z1 = z[r, s] + Z_REF, z[r, s + 1] + Z_REF
            den = (z0 + z1) * (z0 + z1)
            z.grad[r, s] += grc[r, s] * (-2.0 * z1 / den)
        if s > 0:
            z0, z1 = z[r, s - 1] + Z_REF, z[r, s] + Z_REF
            den = (z0 + z1) * (z0 + z1)
            z.grad[r, s] += grc[r, s - 1] * (2.0 * z0 / den)


def reverb_steps(n_samples: int) -> int:
    """Number of time steps T of the reverb recursion for n_samples samples per ray."""
    return max(2 * n_samples - 3, 1)


def _ceil_sqrt(n: int) -> int:
    c = 1
    while c * c < n:
        c += 1
    return c


class ReverbScratch:
    """Scratch fields of the reverb model for (rays, samples) profiles.

    Args:
        rays, samples: profile shape (samples >= 2).
        dtype: Taichi real type of the profiles.
        grad: allocate the checkpoint and backward buffers (needed under ``ti.ad.Tape``).
        checkpoint_steps: time steps C between checkpoints (default ceil(sqrt(T)), T = 2 S - 3,
            which minimises the memory; the backward recomputes the forward once either way).

    Memory (values of ``dtype``): rays * samples * (3 + ceil(T / C) + C + 3) with ``grad``,
    rays * samples * 3 without (e.g. 256 x 512, f32, grad: 256*512*70*4 B = 36.7 MB)."""

    def __init__(self, rays, samples, dtype, grad=True, checkpoint_steps=None):
        if samples < 2 or rays < 1:
            raise ValueError(f"reverb needs rays >= 1 and samples >= 2, got ({rays}, {samples})")
        T = reverb_steps(samples)
        C = int(checkpoint_steps) if checkpoint_steps is not None else _ceil_sqrt(T)
        if C < 1:
            raise ValueError(f"checkpoint_steps must be >= 1, got {checkpoint_steps}")
        C = min(C, T)
        nk = -(-T // C)
        C = -(-T // nk)                 # same number of segments, smallest segment buffer
        self.shape, self.dtype, self.grad = (rays, samples), dtype, grad
        self.checkpoint_steps, self.n_checkpoints = C, nk
        self.w, self.rcf, self.ef = (ti.field(dtype, shape=(rays, samples)) for _ in range(3))
        if grad:
            self.ck = ti.field(dtype, shape=(rays, nk, samples))
            self.seg = ti.field(dtype, shape=(rays, C, samples))
            self.gw, self.grc, self.ge = (ti.field(dtype, shape=(rays, samples)) for _ in range(3))
        else:
            self.ck = ti.field(dtype, shape=(1, 1, 1))   # placeholder, never accessed
        self.nbytes = rays * samples * (3 + (nk + C + 3 if grad else 0)) * (8 if dtype == ti.f64 else 4)

    def check(self, z):
        if tuple(z.shape) != self.shape:
            raise ValueError(f"reverb scratch was allocated for {self.shape}, profiles are {tuple(z.shape)}")


@ti.ad.grad_replaced
def reverb_trace(z, alpha, np_per_dbcm_step, trace, scratch):
    """Differentiable reverb trace: trace[r, s] from impedances z and attenuation alpha (fields
    (rays, samples)); np_per_dbcm_step = nepers per (dB/cm/MHz) per step (no gradient).
    ``scratch``: :class:`ReverbScratch` of the same shape (``grad=True`` for ``ti.ad.Tape``)."""
    scratch.check(z)
    reverb_fwd(z, alpha, float(np_per_dbcm_step), scratch.w, scratch.rcf, scratch.ef, scratch.ck,
               trace, bool(scratch.grad))


@ti.ad.grad_for(reverb_trace)
def _reverb_trace_grad(z, alpha, np_per_dbcm_step, trace, scratch):
    if not scratch.grad:
        raise RuntimeError("reverb_trace: the scratch was allocated with grad=False; "
                           "allocate ReverbScratch(..., grad=True) to differentiate")
    reverb_bwd(z, alpha, float(np_per_dbcm_step), scratch.w, scratch.rcf, scratch.ef, scratch.ck,
               scratch.seg, scratch.gw, scratch.grc, scratch.ge, trace)


# --------------------------------------------------------------------------------------------
# NumPy-facing helpers (run the same kernels on given profiles; for checks and references)
# --------------------------------------------------------------------------------------------
def _profile_fields(z, name, n_fields):
    """Validate profiles z (rays, samples) in MRayl; allocate n_fields fields of that shape in one
    go (one Taichi SNode tree) and return (z, fields, upload) with upload(field, values)."""
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
    fields = [ti.field(real, shape=z.shape) for _ in range(n_fields)]

    def upload(f, a):
        f.from_numpy(np.broadcast_to(np.asarray(a, dtype=np.float64), z.shape).astype(npreal))

    return z, fields, upload


def layered_returns(z):
    """Surface returns of layered stacks, computed by the Taichi star-product kernel.

    Args:
        z: (rays, N+1) impedances (any positive unit, e.g. MRayl), layer 0 = coupling medium.
    Returns:
        (rays, N) float64: d0[:, i] = pressure reflection seen from layer 0 of the stack made of
        interfaces 0..i (physical convention: +r for a wave going deeper, -r coming back).
        Runs on the current Taichi backend (CPU f64 if none is initialised).
    """
    z, (zf, *out), upload = _profile_fields(z, "layered_returns", 6)
    upload(zf, z - Z_REF)
    _layered_fwd(zf, *out)
    return out[0].to_numpy()[:, :-1].astype("float64")


def echo_profiles(z, model="primary", alpha=0.0, cosw=1.0, np_per_dbcm_step=0.0):
    """Run an echo model on given profiles (rays, samples): z (MRayl), alpha (dB/cm/MHz),
    cosw (incidence weight), np_per_dbcm_step = nepers per (dB/cm/MHz) per step
    (= f_MHz * step_cm / 8.686). Returns (echo, gain) as float64 (rays, samples)."""
    if model not in ("primary", "layered", "reverb"):
        raise ValueError(f"unknown echo model {model!r}")
    z, fields, upload = _profile_fields(z, "echo_profiles", 13)
    zf, af, cf, logt, att2, cum, echo, gain, ret, tr2, sR, sRp, sP = fields
    scratch = ReverbScratch(z.shape[0], z.shape[1], zf.dtype, grad=False) if model == "reverb" else None
    upload(zf, z - Z_REF)
    upload(af, alpha)
    upload(cf, cosw)
    step_terms(zf, af, np_per_dbcm_step, logt, att2)
    if model == "layered":
        _cumsum_fwd(att2, cum)
        _layered_fwd(zf, ret, tr2, sR, sRp, sP)
        layered_combine(ret, tr2, cum, echo, gain)
    elif model in ("primary", "reverb"):
        _cumsum_fwd(logt, cum)
        primary_combine(zf, cf, cum, echo, gain)
        if model == "reverb":
            reverb_trace(zf, af, np_per_dbcm_step, echo, scratch)
    return echo.to_numpy().astype("float64"), gain.to_numpy().astype("float64")
