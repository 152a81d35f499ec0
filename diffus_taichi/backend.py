"""Taichi backend selection: ``auto`` = CUDA, else Vulkan, else CPU.

Never uses ``ti.gpu`` (it probes OpenGL, which segfaults without a display).
The arch can also be chosen with the environment variable ``DIFFUS_ARCH``.

Importing this module applies the Taichi start-up patches of :mod:`diffus_taichi.taichi_patches`
(pinned taichi 1.7.4 only; ``DIFFUS_NO_TAICHI_PATCH=1`` disables them).
"""
from __future__ import annotations

import logging
import os

import taichi as ti

from .taichi_patches import PATCHES, _FastTextWrapper, apply_startup_patches  # noqa: F401

log = logging.getLogger(__name__)

ARCHS = {"cuda": ti.cuda, "vulkan": ti.vulkan, "cpu": ti.cpu}
AUTO_ORDER = ("cuda", "vulkan", "cpu")
ENV_VAR = "DIFFUS_ARCH"

_state = {"arch": None, "precision": None}

apply_startup_patches()


# Taichi 1.7.4's CPU backend hands a range-for to its thread pool in tasks of up to ~512
# iterations: a loop over 256 rays (samples serial inside) ran on one thread (measured: cpu time /
# wall = 1.0 with 2 threads; the same loop over 2048 indices of which every 8th works: 1.86, half
# the wall time). Per-ray kernels therefore loop over n_rays * pad indices on CPU.
RAY_LOOP_MIN_ITERS = 8192


def ray_loop_pad(n_rays: int) -> int:
    """Index stride of the per-ray loops (``for rr in range(n_rays * pad)``, ray rr // pad, only
    every pad-th index works): enough indices for every CPU thread to get several tasks; 1 on GPU
    backends (one thread per ray already) and for large batches."""
    if _state["arch"] != "cpu":
        return 1
    return max(1, -(-RAY_LOOP_MIN_ITERS // max(1, int(n_rays))))


def lateral_loop_pad(n_rays: int) -> int:
    """``pad`` of fused.lateral_envelope_log: 0 on GPU backends (one thread per output), else
    :func:`ray_loop_pad` of its rays (one task per line, a vectorised loop over samples, on
    CPU)."""
    return 0 if _state["arch"] != "cpu" else ray_loop_pad(n_rays)


def arch_supported(name: str) -> bool:
    """True if Taichi can run kernels on backend ``name`` (cuda, vulkan or cpu) here."""
    from taichi.lang.misc import is_arch_supported

    if name not in ARCHS:
        raise ValueError(f"unknown arch {name!r}; choose one of auto, {', '.join(ARCHS)}")
    if name == "cpu":
        return True
    try:
        return bool(is_arch_supported(ARCHS[name]))
    except Exception:  # pragma: no cover - driver probing failures mean 'not available'
        return False


def available_archs() -> list[str]:
    """Backends usable on this machine, in ``auto`` preference order."""
    return [a for a in AUTO_ORDER if arch_supported(a)]


def resolve_arch(arch: str | None = None) -> str:
    """Turn ``auto``/None/env into a concrete backend name, checking it exists."""
    arch = (arch or os.environ.get(ENV_VAR) or "auto").lower()
    if arch == "auto":
        return available_archs()[0]
    if arch == "gpu":
        raise ValueError("arch 'gpu' is not allowed (it probes OpenGL); use auto, cuda or vulkan")
    if not arch_supported(arch):
        raise RuntimeError(f"Taichi backend {arch!r} is not available on this machine "
                           f"(available: {', '.join(available_archs())})")
    return arch


def init(arch: str | None = None, precision: str = "f32", *, force: bool = False, **kwargs) -> str:
    """Initialise Taichi once per process (or again with ``force=True``).

    Args:
        arch: ``auto`` | ``cuda`` | ``vulkan`` | ``cpu`` (default: ``$DIFFUS_ARCH`` or auto).
        precision: ``f32`` or ``f64`` (f64 only on cpu/cuda; Vulkan lacks f64 transcendentals).
    Returns:
        the backend actually running, confirmed after ``ti.init``.
    """
    name = resolve_arch(arch)
    if precision not in ("f32", "f64"):
        raise ValueError(f"precision must be 'f32' or 'f64', got {precision!r}")
    if precision == "f64" and name == "vulkan":
        raise ValueError("precision f64 is not supported on Vulkan (no f64 exp/log/sin); use f32")
    if _state["arch"] is not None and not force:
        if (_state["arch"], _state["precision"]) != (name, precision):
            raise RuntimeError(f"Taichi already initialised as {_state['arch']}/{_state['precision']}; "
                               f"pass force=True to re-initialise as {name}/{precision}")
        return name
    if _state["arch"] is not None:
        ti.reset()
    opts = dict(arch=ARCHS[name], default_fp=ti.f64 if precision == "f64" else ti.f32,
                log_level=ti.ERROR, offline_cache=True)
    if name == "vulkan":
        opts["default_gpu_block_dim"] = 1024  # lavapipe caps workgroup count at 65535
    opts.update(kwargs)
    ti.init(**opts)
    running = ti.lang.impl.current_cfg().arch
    if running != ARCHS[name]:
        ti.reset()
        raise RuntimeError(f"asked for Taichi backend {name} but Taichi started {running}")
    _state.update(arch=name, precision=precision)
    log.info("taichi initialised: arch=%s precision=%s", name, precision)
    return name


def current() -> tuple[str | None, str | None]:
    """(arch, precision) of the running Taichi runtime, or (None, None)."""
    return _state["arch"], _state["precision"]


def ensure(arch: str | None = None, precision: str = "f32") -> str:
    """Initialise if needed; if already initialised with other settings, re-initialise."""
    cur_arch, cur_prec = current()
    want = resolve_arch(arch) if (arch or cur_arch is None) else cur_arch
    if cur_arch == want and cur_prec == precision:
        return want
    return init(want, precision, force=cur_arch is not None)


def reset() -> None:
    """Shut Taichi down (fields become invalid)."""
    if _state["arch"] is not None:
        ti.reset()
    _state.update(arch=None, precision=None)
