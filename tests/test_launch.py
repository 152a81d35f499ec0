"""launch.fast_call: the same results as a plain kernel call, a new instance when a template
argument changes, plain (recorded) launches under a ti.ad.Tape, on every backend."""
import numpy as np
import pytest
import taichi as ti

from diffus_taichi import launch


@ti.kernel
def _axpy(a: float, n: ti.i32, x: ti.types.ndarray(ndim=1), y: ti.template(),
          power: ti.template(), out: ti.types.ndarray()):
    for i in range(y.shape[0]):
        v = a * x[i] ** power + y[i] + n
        y[i] = v
        out[i] = v


def test_fast_call_equals_plain_call(arch):
    rng = np.random.default_rng(0)
    y = ti.field(ti.f32, shape=16)
    for rep in range(3):                       # first call plain, then the fast path
        for power in (1, 2):                   # a template argument: two instances
            x = rng.standard_normal(16).astype(np.float32)
            y0 = rng.standard_normal(16).astype(np.float32)
            a, n = float(rng.uniform(-2, 2)), int(rng.integers(-3, 4))
            y.from_numpy(y0)
            out = np.zeros(16, np.float32)
            launch.fast_call(_axpy, a, n, x, y, power, out)
            want = (np.float32(a) * x ** power + y0 + n).astype(np.float32)
            np.testing.assert_allclose(y.to_numpy(), want, rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(out, y.to_numpy())     # the NumPy argument written
    # a ti.ndarray where a NumPy array was: another instance, the same values
    nd = ti.ndarray(ti.f32, shape=16)
    y.from_numpy(np.zeros(16, np.float32))
    x = np.arange(16, dtype=np.float32)
    launch.fast_call(_axpy, 1.0, 0, x, y, 1, nd)
    launch.fast_call(_axpy, 1.0, 0, x, y, 1, nd)
    np.testing.assert_allclose(nd.to_numpy(), 2.0 * x)
    # both instances are cached under their own keys; the plan is kept
    cache = _axpy._diffus_fast
    assert cache["plan"] is not None and len(cache) >= 4


def test_fast_call_is_recorded_by_a_tape(cpu32):
    """Outside a grad_replaced function a Tape must see the launch (it then runs the kernel's
    automatic adjoint): fast_call takes the plain path there."""
    x = ti.field(ti.f32, shape=8, needs_grad=True)
    loss = ti.field(ti.f32, shape=(), needs_grad=True)

    @ti.kernel
    def square_sum(x: ti.template(), loss: ti.template(), w: float):
        for i in x:
            loss[None] += w * x[i] * x[i]

    xv = np.linspace(-1, 1, 8).astype(np.float32)
    x.from_numpy(xv)
    launch.fast_call(square_sum, x, loss, 1.0)         # compiled, cached
    loss[None] = 0.0
    with ti.ad.Tape(loss=loss):
        launch.fast_call(square_sum, x, loss, 3.0)
    np.testing.assert_allclose(loss[None], 3.0 * np.sum(xv ** 2), rtol=1e-6)
    np.testing.assert_allclose(x.grad.to_numpy(), 6.0 * xv, rtol=1e-6)


def test_fast_call_leaves_other_arrays_to_taichi(cpu32):
    """A non-contiguous NumPy array goes through Taichi's own call (and its error message)."""
    y = ti.field(ti.f32, shape=16)
    out = np.zeros(16, np.float32)
    x = np.zeros(32, np.float32)
    launch.fast_call(_axpy, 1.0, 0, x[:16], y, 1, out)          # compiles the instance
    with pytest.raises(ValueError, match="[Nn]on contiguous"):
        launch.fast_call(_axpy, 1.0, 0, x[::2], y, 1, out)
