"""Reverb echo model (time-resolved Goupillaud medium): forward unchanged against a NumPy port of
the original down/up recursion, hand-written checkpointed backward against central finite
differences (CPU f64) and across backends (f32 vs CPU f64), and a Simulator-level Tape run."""
import numpy as np
import pytest
import taichi as ti

from diffus_taichi import backend
from diffus_taichi import echo as echo_mod
from diffus_taichi.echo import ReverbScratch, echo_profiles, reverb_trace
from diffus_taichi.probe import get_probe
from diffus_taichi.simulator import Simulator

NP_STEP = 0.03   # nepers per (dB/cm/MHz) per step


def reverb_numpy(z, alpha, np_step):
    """Direct NumPy port of the original (unpacked down/up) reverb recursion, f64."""
    z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    alpha = np.broadcast_to(np.asarray(alpha, dtype=np.float64), z.shape)
    R, S = z.shape
    NI = S - 1
    out = np.zeros((R, S))
    for r in range(R):
        down, up = np.zeros(S), np.zeros(S)
        down[0] = 1.0
        for t in range(2 * NI - 1):
            imax = min(t, 2 * NI - 2 - t)
            for i in range(t % 2, min(imax, NI - 1) + 1, 2):
                a, b = down[i], up[i]
                rc = (z[r, i + 1] - z[r, i]) / (z[r, i + 1] + z[r, i])
                d_out = (1 + rc) * a - rc * b
                u_out = rc * a + (1 - rc) * b
                down[i] = up[i] = 0.0
                if i + 1 < NI:
                    down[i + 1] = d_out * np.exp(-alpha[r, i + 1] * np_step)
                if i == 0:
                    out[r, t // 2] = u_out
                else:
                    up[i - 1] = u_out * np.exp(-alpha[r, i] * np_step)
    return out


@ti.kernel
def _weighted_sum(a: ti.template(), w: ti.template(), loss: ti.template()):
    for r, s in a:
        loss[None] += w[r, s] * a[r, s]


class _ReverbLoss:
    """loss = sum(w * reverb_trace(z, alpha)) on fields allocated once (every field is created
    before the first upload, so they share one SNode tree: Taichi caps the number of trees)."""

    def __init__(self, shape, w, checkpoint_steps=None, grad=True):
        prec = backend.current()[1]
        self.real = ti.f64 if prec == "f64" else ti.f32
        self.npr = np.float64 if prec == "f64" else np.float32
        self.zf, self.af, self.wf, self.tr = (ti.field(self.real, shape=shape, needs_grad=True)
                                              for _ in range(4))
        self.loss = ti.field(self.real, shape=(), needs_grad=True)
        self.scratch = ReverbScratch(*shape, self.real, grad=grad, checkpoint_steps=checkpoint_steps)
        self.wf.from_numpy(np.asarray(w, dtype=self.npr))

    def __call__(self, z, alpha, grad=True):
        """Returns (loss, dloss/dz, dloss/dalpha, trace) (gradients None without ``grad``)."""
        self.zf.from_numpy(np.asarray(z - echo_mod.Z_REF, dtype=self.npr))   # kernels take Z - Z_REF
        self.af.from_numpy(np.asarray(alpha, dtype=self.npr))

        def run():
            reverb_trace(self.zf, self.af, NP_STEP, self.tr, self.scratch)
            _weighted_sum(self.tr, self.wf, self.loss)

        if grad:
            with ti.ad.Tape(loss=self.loss):
                run()
            return self.loss[None], self.zf.grad.to_numpy(), self.af.grad.to_numpy(), self.tr.to_numpy()
        self.loss[None] = 0
        run()
        return self.loss[None], None, None, self.tr.to_numpy()


def _reverb_loss(z, alpha, w, grad=True, checkpoint_steps=None):
    return _ReverbLoss(z.shape, w, checkpoint_steps, grad)(z, alpha, grad)


def _checkpointed_trace(z, alpha, w, checkpoint_steps):
    """Trace of the grad-enabled forward (scratch with grad=True: the forward kernel saves the
    checkpoints the backward replays) run without a Tape, so that no backward kernel is compiled
    for a check of the forward values."""
    return _ReverbLoss(z.shape, w, checkpoint_steps, grad=True)(z, alpha, grad=False)[3]


def _problem(rng, R=3, S=40):
    z = rng.uniform(1.3, 2.2, size=(R, S))
    alpha = rng.uniform(0.1, 1.5, size=(R, S))
    return z, alpha, rng.normal(size=(R, S))


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("S", [2, 3, 4, 7, 40])
def test_forward_matches_original_recursion(cpu64, rng, S):
    z, alpha, w = _problem(rng, S=S)
    ref = reverb_numpy(z, alpha, NP_STEP)
    e, _ = echo_profiles(z, "reverb", alpha=alpha, np_per_dbcm_step=NP_STEP)
    assert np.abs(e - ref).max() <= 1e-13
    # the grad-enabled forward (checkpoints saved) computes the same trace
    for C in (None, 1, 5, 1000):
        assert np.array_equal(_checkpointed_trace(z, alpha, w, C), e)


def test_forward_three_layers_first_arrivals(arch):
    a, b, S = 10, 30, 64
    z0, z1, z2 = 1.5, 2.5, 1.2
    z = np.array([[z0] * (a + 1) + [z1] * (b - a) + [z2] * (S - b - 1)])
    ra, rb = (z1 - z0) / (z1 + z0), (z2 - z1) / (z2 + z1)
    expect = {a: ra, b: (1 + ra) * (1 - ra) * rb, 2 * b - a: (1 + ra) * rb * (-ra) * rb * (1 - ra)}
    # through the differentiable wrapper with checkpoints (grad scratch), not just echo_profiles
    tr = _checkpointed_trace(z, np.zeros_like(z), np.ones_like(z), 8)[0]
    for t, amp in expect.items():
        assert abs(tr[t] - amp) < 1e-5 * max(1.0, abs(amp)) + 1e-7, (t, tr[t], amp)
    assert np.abs(np.delete(tr, list(expect))[: 2 * b - a - 2]).max() < 1e-7


def test_scratch_memory_and_segments():
    backend.ensure("cpu", "f32")
    s = ReverbScratch(4, 512, ti.f32)
    T = 2 * 512 - 3
    assert s.checkpoint_steps * s.n_checkpoints >= T > s.checkpoint_steps * (s.n_checkpoints - 1)
    assert s.checkpoint_steps == 32 and s.n_checkpoints == 32
    assert s.nbytes == 4 * 512 * (3 + 32 + 32 + 3) * 4
    assert ReverbScratch(4, 512, ti.f32, grad=False).nbytes == 4 * 512 * 3 * 4
    with pytest.raises(ValueError):
        ReverbScratch(4, 1, ti.f32)


def test_backward_without_grad_scratch_raises(cpu64, rng):
    z, alpha, w = _problem(rng, S=10)
    with pytest.raises(RuntimeError, match="grad=False"):
        zf = ti.field(ti.f64, shape=z.shape, needs_grad=True)
        af = ti.field(ti.f64, shape=z.shape, needs_grad=True)
        tr = ti.field(ti.f64, shape=z.shape, needs_grad=True)
        wf = ti.field(ti.f64, shape=z.shape)
        loss = ti.field(ti.f64, shape=(), needs_grad=True)
        zf.from_numpy(z)
        af.from_numpy(alpha)
        wf.from_numpy(w)
        with ti.ad.Tape(loss=loss):
            reverb_trace(zf, af, NP_STEP, tr, ReverbScratch(*z.shape, ti.f64, grad=False))
            _weighted_sum(tr, wf, loss)


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("S,C", [(40, None), (40, 1000), (100, 32), (5, 2)])
def test_backward_matches_finite_differences_f64(cpu64, rng, S, C):
    """S=40 default C=9 (9 segments); C=1000: one segment; S=100, C=32: 7 segments; tiny S."""
    z, alpha, w = _problem(rng, S=S)
    f = _ReverbLoss(z.shape, w, checkpoint_steps=C)
    _, gz, ga, _ = f(z, alpha)
    h = 1e-6
    idx = [(0, 0), (1, 5 % S), (2, 17 % S), (0, S - 2), (1, S - 1), (2, S // 2), (0, S // 3),
           (1, (2 * S) // 3)]
    for arr, g in ((z, gz), (alpha, ga)):
        for (r, s) in idx:
            old = arr[r, s]
            arr[r, s] = old + h
            lp = f(z, alpha, grad=False)[0]
            arr[r, s] = old - h
            lm = f(z, alpha, grad=False)[0]
            arr[r, s] = old
            fd = (lp - lm) / (2 * h)
            assert abs(g[r, s] - fd) <= 1e-5 * max(1.0, abs(fd)), (S, C, r, s, g[r, s], fd)
    # every entry at once: directional derivative along a random direction
    vz, va = rng.normal(size=z.shape), rng.normal(size=z.shape)
    lp = f(z + h * vz, alpha + h * va, grad=False)[0]
    lm = f(z - h * vz, alpha - h * va, grad=False)[0]
    fd = (lp - lm) / (2 * h)
    ad = (gz * vz).sum() + (ga * va).sum()
    assert abs(ad - fd) <= 1e-5 * max(1.0, abs(fd)), (ad, fd)
    assert np.abs(ga).max() > 0 and np.abs(gz).max() > 0
    assert np.all(ga[:, 0] == 0) and np.all(ga[:, -1] == 0)   # layer 0 and the half-space


def test_backward_independent_of_checkpoint_interval(cpu64, rng):
    z, alpha, w = _problem(rng, S=60)
    _, gz0, ga0, _ = _reverb_loss(z, alpha, w, checkpoint_steps=10_000)
    for C in (1, 2, 7, 32):
        _, gz, ga, _ = _reverb_loss(z, alpha, w, checkpoint_steps=C)
        assert np.abs(gz - gz0).max() <= 1e-12 * np.abs(gz0).max()
        assert np.abs(ga - ga0).max() <= 1e-12 * np.abs(ga0).max()


F32_CASES = [(40, None), (100, 32)]


@pytest.fixture(scope="module")
def ref64():
    """CPU-f64 gradients of the F32_CASES problems (the data of the rng fixture), computed once
    and shared by every f32 backend."""
    backend.ensure("cpu", "f64")
    out = {}
    for S, C in F32_CASES:
        z, alpha, w = _problem(np.random.default_rng(1234), S=S)
        _, gz64, ga64, _ = _reverb_loss(z, alpha, w, checkpoint_steps=C)
        out[S, C] = (z, alpha, w, gz64, ga64)
    return out


@pytest.mark.parametrize("S,C", F32_CASES)
def test_backward_f32_matches_cpu_f64(ref64, arch, S, C):
    z, alpha, w, gz64, ga64 = ref64[S, C]
    _, gz32, ga32, _ = _reverb_loss(z, alpha, w, checkpoint_steps=C)
    for a, b in ((gz32, gz64), (ga32, ga64)):
        assert np.all(np.isfinite(a))
        assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max()


# ---------------------------------------------------------------------------------------------
# Simulator
# ---------------------------------------------------------------------------------------------
@ti.kernel
def _fan_loss(fan: ti.template(), wt: ti.template(), loss: ti.template()):
    for i, j in fan:
        loss[None] += wt[i, j] * fan[i, j] * fan[i, j]


def test_simulator_reverb_tape_runs(cpu32, rng, monkeypatch, phantom_volume):
    probe = get_probe("craniotomy", n_lines=32, n_samples=96, image_px=(64, 64))
    sim = Simulator(phantom_volume, probe=probe, echo_model="reverb", arch="cpu", requires_grad=True)
    sim.set_pose()
    wt = ti.field(sim.real, shape=sim.fan.shape)
    wt.from_numpy(rng.uniform(0.5, 1.5, size=sim.fan.shape).astype(np.float32))
    loss = ti.field(sim.real, shape=(), needs_grad=True)
    seen, orig = [], echo_mod.reverb_bwd

    def spy(z, alpha, *args):   # the reverb backward runs and feeds the profile gradients
        orig(z, alpha, *args)   # (march's backward consumes z.grad later, so look here)
        seen.append((np.abs(z.grad.to_numpy()).max(), np.abs(alpha.grad.to_numpy()).max()))

    monkeypatch.setattr(echo_mod, "reverb_bwd", spy)
    with ti.ad.Tape(loss=loss):
        sim.forward()
        _fan_loss(sim.fan, wt, loss)
    g = sim.pose.grad.to_numpy()
    assert np.isfinite(loss[None]) and loss[None] > 0
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, g
    assert len(seen) == 1 and np.isfinite(seen[0]).all() and min(seen[0]) > 0, seen
