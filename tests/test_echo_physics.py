"""Echo physics on analytic layered media, against dense solves and closed forms; hand-written
backward kernels against finite differences (CPU f64) and across backends."""
import numpy as np
import pytest
import taichi as ti

from diffus_taichi import backend, echo
from diffus_taichi.echo import echo_profiles, layered_returns


def dense_surface_returns(z):
    """Prototype's algorithm (corrected sign): for every depth n, solve the dense 2(n+1) system
    of pressure and particle-velocity continuity at interfaces 0..n (zero-thickness layers),
    incident amplitude 1 in layer 0, no up-going wave in the last layer; return B_0."""
    z = np.asarray(z, dtype=np.float64)
    out = []
    for n in range(len(z) - 1):
        L = n + 2                    # layers 0..n+1
        # unknowns: B_0, A_1, B_1, ..., A_n, B_n, A_{n+1}   (A_0 = 1, B_{n+1} = 0)
        idx = {("B", 0): 0}
        k = 1
        for j in range(1, L - 1):
            idx[("A", j)] = k
            idx[("B", j)] = k + 1
            k += 2
        idx[("A", L - 1)] = k
        N = k + 1
        M = np.zeros((N, N))
        rhs = np.zeros(N)
        row = 0
        for j in range(L - 1):       # interface between layer j and j+1
            for kind in ("p", "v"):
                for layer, sign in ((j, 1.0), (j + 1, -1.0)):
                    for wave, wsign in (("A", 1.0), ("B", -1.0 if kind == "v" else 1.0)):
                        coef = sign * wsign * (1.0 / z[layer] if kind == "v" else 1.0)
                        if wave == "A" and layer == 0:
                            rhs[row] -= coef * 1.0
                        elif wave == "B" and layer == L - 1:
                            pass
                        else:
                            M[row, idx[(wave, layer)]] += coef
                row += 1
        assert row == N == 2 * (n + 1)
        out.append(np.linalg.solve(M, rhs)[0])
    return np.array(out)


def test_dense_reference_single_interface():
    assert dense_surface_returns([1.0, 3.0])[0] == pytest.approx(0.5)


def test_one_interface_primary_equals_reflection_coefficient(arch):
    z1, z2 = 1.48, 1.62
    z = np.array([[z1] * 8 + [z2] * 8, [z2] * 8 + [z1] * 8])
    e, g = echo_profiles(z, "primary")
    for row, (a, b) in zip(e, ((z1, z2), (z2, z1))):
        assert abs(row[7] - (b - a) / (b + a)) < 1e-5
        assert np.abs(np.delete(row, 7)).max() < 1e-7
    assert np.allclose(g[:, 8:], 1 - ((z2 - z1) / (z2 + z1)) ** 2, atol=1e-6)


def test_prototype_example_energy():
    """Z = 1, 2, 1.5: the physical convention keeps R^2 + T T' = 1 (the prototype lost 16 %)."""
    backend.ensure("cpu", "f64")
    z = np.array([[1.0, 2.0, 1.5]])
    ret = layered_returns(z)
    assert ret[0, 1] == pytest.approx(0.2, abs=1e-12)
    e, g = echo_profiles(z, "layered")
    assert ret[0, 1] ** 2 + g[0, 2] == pytest.approx(1.0, abs=1e-12)


def test_layered_returns_match_dense_solve(arch, rng):
    z = rng.uniform(0.5, 4.0, size=(6, 13))
    got = layered_returns(z)
    ref = np.stack([dense_surface_returns(row) for row in z])
    assert np.abs(got - ref).max() < 1e-5
    # steady state without travel time: a single effective interface z0 | z_{i+1}
    closed = (z[:, 1:] - z[:, :1]) / (z[:, 1:] + z[:, :1])
    assert np.abs(got - closed).max() < 1e-5


def test_layered_energy_conservation(cpu64, rng):
    z = rng.uniform(0.2, 8.0, size=(16, 200))
    e, g = echo_profiles(z, "layered")
    ret = layered_returns(z)
    # lossless stack: reflected + transmitted energy = 1 after every interface
    assert np.abs(ret ** 2 + g[:, 1:] - 1.0).max() < 1e-10


def test_reverb_three_layers_first_arrivals(arch):
    a, b, S = 10, 30, 64
    z0, z1, z2 = 1.5, 2.5, 1.2
    z = np.array([[z0] * (a + 1) + [z1] * (b - a) + [z2] * (S - b - 1)])
    tr, _ = echo_profiles(z, "reverb")
    tr = tr[0]
    ra, rb = (z1 - z0) / (z1 + z0), (z2 - z1) / (z2 + z1)
    expect = {a: ra, b: (1 + ra) * (1 - ra) * rb, 2 * b - a: (1 + ra) * rb * (-ra) * rb * (1 - ra)}
    for t, amp in expect.items():
        assert abs(tr[t] - amp) < 1e-5 * max(1.0, abs(amp)) + 1e-7, (t, tr[t], amp)
    others = np.delete(tr, list(expect))
    # nothing arrives before the first multiple except the two primaries
    assert np.abs(others[: 2 * b - a - 2]).max() < 1e-7


def test_reverb_attenuation_matches_primary(cpu64):
    """With attenuation and no multiples (single interface) reverb and primary agree."""
    z = np.array([[1.5] * 20 + [1.7] * 20])
    al = np.full_like(z, 0.7)
    e1, _ = echo_profiles(z, "primary", alpha=al, np_per_dbcm_step=0.05)
    e2, _ = echo_profiles(z, "reverb", alpha=al, np_per_dbcm_step=0.05)
    assert e1[0, 19] == pytest.approx(e2[0, 19], rel=1e-10)
    assert e1[0, 19] == pytest.approx(0.2 / 3.2 * np.exp(-2 * 0.7 * 0.05 * 19), rel=1e-10)


# ---------------------------------------------------------------------------------------------
# hand-written backward kernels
# ---------------------------------------------------------------------------------------------
@ti.kernel
def _weighted_sum(a: ti.template(), w: ti.template(), loss: ti.template()):
    for r, s in a:
        loss[None] += w[r, s] * a[r, s]


class _EchoLoss:
    """loss = sum(w1 * echo + w2 * gain) through the kernels used by the Simulator, on fields
    allocated once (a finite-difference check then compiles the kernels once, not once per
    evaluation); __call__(z, alpha, grad) returns (loss, dloss/dz, dloss/dalpha)."""

    def __init__(self, shape, w1, w2, model):
        prec = backend.current()[1]
        real = ti.f64 if prec == "f64" else ti.f32
        self.npr = np.float64 if prec == "f64" else np.float32
        self.model = model

        def f(a=None):
            fld = ti.field(real, shape=shape, needs_grad=True)
            if a is not None:
                fld.from_numpy(np.asarray(a, dtype=self.npr))
            return fld

        self.zf, self.af, self.cf = f(), f(), f(np.ones(shape))
        self.w1f, self.w2f = f(w1), f(w2)
        self.logt, self.att2, self.cum, self.ech, self.gain = f(), f(), f(), f(), f()
        self.ret, self.tr2 = f(), f()
        self.sR, self.sRp, self.sP = (ti.field(real, shape=shape) for _ in range(3))
        self.loss = ti.field(real, shape=(), needs_grad=True)

    def _run(self):
        echo.step_terms(self.zf, self.af, 0.03, self.logt, self.att2)
        if self.model == "layered":
            echo.exclusive_cumsum(self.att2, self.cum)
            echo.layered_stack(self.zf, self.ret, self.tr2, self.sR, self.sRp, self.sP)
            echo.layered_combine(self.ret, self.tr2, self.cum, self.ech, self.gain)
        else:
            echo.exclusive_cumsum(self.logt, self.cum)
            echo.primary_combine(self.zf, self.cf, self.cum, self.ech, self.gain)
        _weighted_sum(self.ech, self.w1f, self.loss)
        _weighted_sum(self.gain, self.w2f, self.loss)

    def __call__(self, z, alpha, grad=True):
        self.zf.from_numpy(np.asarray(z - echo.Z_REF, dtype=self.npr))   # kernels take Z - Z_REF
        self.af.from_numpy(np.asarray(alpha, dtype=self.npr))
        if grad:
            with ti.ad.Tape(loss=self.loss):
                self._run()
            return self.loss[None], self.zf.grad.to_numpy(), self.af.grad.to_numpy()
        self.loss[None] = 0
        self._run()
        return self.loss[None], None, None


def _echo_loss(z, alpha, w1, w2, model, grad=True):
    return _EchoLoss(z.shape, w1, w2, model)(z, alpha, grad)


def _problem(rng, R=3, S=40):
    z = rng.uniform(1.3, 2.2, size=(R, S))
    alpha = rng.uniform(0.1, 1.5, size=(R, S))
    return z, alpha, rng.normal(size=(R, S)), rng.normal(size=(R, S))


@pytest.mark.parametrize("model", ["primary", "layered"])
def test_backward_matches_finite_differences_f64(cpu64, rng, model):
    z, alpha, w1, w2 = _problem(rng)
    f = _EchoLoss(z.shape, w1, w2, model)      # one set of fields: the kernels compile once
    _, gz, ga = f(z, alpha)
    h = 1e-6
    for arr, g in ((z, gz), (alpha, ga)):
        for (r, s) in [(0, 0), (1, 5), (2, 17), (0, 38), (1, 39), (2, 20)]:
            old = arr[r, s]
            arr[r, s] = old + h
            lp, _, _ = f(z, alpha, grad=False)
            arr[r, s] = old - h
            lm, _, _ = f(z, alpha, grad=False)
            arr[r, s] = old
            fd = (lp - lm) / (2 * h)
            assert abs(g[r, s] - fd) <= 1e-5 * max(1.0, abs(fd)), (model, r, s, g[r, s], fd)


@pytest.mark.parametrize("model", ["primary", "layered"])
def test_backward_f32_matches_cpu_f64(arch, rng, model):
    z, alpha, w1, w2 = _problem(rng)
    _, gz32, ga32 = _echo_loss(z, alpha, w1, w2, model)
    backend.ensure("cpu", "f64")
    _, gz64, ga64 = _echo_loss(z, alpha, w1, w2, model)
    for a, b in ((gz32, gz64), (ga32, ga64)):
        assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max()
