"""Arithmetic-only f32 exp and log (Cephes expf/logf): no libm call, so a CPU loop that uses
them can vectorise (LLVM does not vectorise a loop that calls expf or logf), and a serial loop
need not spill its live registers around a call (every xmm register is caller-saved).
Accuracy ~1 f32 ulp (tests/test_render.py); :func:`exp_real` and :func:`log_real` use them in
f32 and Taichi's exp/log in f64."""

import taichi as ti
from taichi.lang import impl

# Cephes logf: ln(1 + x) = x - x^2/2 + x^3 P(x) on sqrt(1/2) - 1 <= x < sqrt(2) - 1, P's
# coefficients highest degree first; ln 2 = 0.693359375 - 2.12194440e-4 (exact head + tail)
_LOGF_P = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
           1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
           3.3333331174e-1)


@ti.func
def log_f32(x):
    """Natural logarithm of a normal f32 x > 0 in arithmetic only (Cephes logf: exponent and
    mantissa by bit manipulation, then a polynomial). Not for 0, subnormals, inf or NaN."""
    bits = ti.bit_cast(x, ti.i32)
    m = ti.bit_cast((bits & 0x007FFFFF) | 0x3F000000, ti.f32)      # x = m 2^e, m in [1/2, 1)
    low = m < 0.70710678118654752
    e = ti.cast(((bits >> 23) & 0xFF) - 126, ti.f32) - ti.select(low, 1.0, 0.0)
    t = ti.select(low, m + m, m) - 1.0                             # x = (1 + t) 2^e
    z = t * t
    y = _LOGF_P[0] * t
    for i in ti.static(range(1, len(_LOGF_P))):
        y = (y + _LOGF_P[i]) * t
    return t + (y * z - 2.12194440e-4 * e - 0.5 * z) + 0.693359375 * e


@ti.func
def log_real(x):
    """ln x (x > 0 normal): :func:`log_f32` in f32, ti.log in f64."""
    y = x
    if ti.static(impl.get_runtime().default_fp == ti.f32):
        y = log_f32(x)
    else:
        y = ti.log(x)
    return y


# Cephes expf: e^x = 2^n e^t, n = round(x / ln 2), t = x - n ln 2 (ln 2 in two parts as above),
# e^t = 1 + t + t^2 Q(t); Q's coefficients highest degree first
_EXPF_Q = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
           1.6666665459e-1, 5.0000001201e-1)


@ti.func
def exp_f32(x):
    """e^x in f32 arithmetic only (Cephes expf). x is clamped to [-87, 88] (results from
    1.6e-38, normal, to 1.7e38)."""
    xc = ti.min(ti.max(x, -87.0), 88.0)
    n = ti.floor(xc * 1.4426950408889634 + 0.5)
    t = (xc - n * 0.693359375) + n * 2.12194440e-4
    y = _EXPF_Q[0] * t
    for i in ti.static(range(1, len(_EXPF_Q))):
        y = (y + _EXPF_Q[i]) * t
    y = y * t + t + 1.0
    return y * ti.bit_cast((ti.cast(n, ti.i32) + 127) << 23, ti.f32)


@ti.func
def exp_real(x):
    """e^x: :func:`exp_f32` in f32, ti.exp in f64."""
    y = x
    if ti.static(impl.get_runtime().default_fp == ti.f32):
        y = exp_f32(x)
    else:
        y = ti.exp(x)
    return y
