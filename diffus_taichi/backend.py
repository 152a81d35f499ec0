"""Taichi backend selection: ``auto`` = CUDA, else Vulkan, else CPU.

Never uses ``ti.gpu`` (it probes OpenGL, which segfaults without a display).
The arch can also be chosen with the environment variable ``DIFFUS_ARCH``.

Start-up patch (:func:`patch_taichi_pos_info`, applied when this module is imported): Taichi
1.7.4 turns every kernel's Python AST into its IR on the first call in each process, even when
the offline cache then supplies the compiled code, and for every AST node it formats a
source-position message (``ASTTransformerContext.get_pos_info``) with ``textwrap.TextWrapper``;
the wrapping alone was ~20 % of the first-frame time with a warm cache. The patch swaps the
``TextWrapper`` name in ``taichi.lang.ast.ast_transformer_utils`` for a subclass whose ``wrap``
returns the identical list without the regex machinery for the common case (an ASCII line of at
most ``width`` characters without tabs or other special whitespace) and memoises the standard
``wrap`` otherwise, so messages, debug info and offline-cache keys are unchanged. It is applied
only on taichi 1.7.4 (the version pinned in pyproject.toml) when that module still has the
expected ``TextWrapper`` and ``ASTTransformerContext.get_pos_info``; on any other version or
layout nothing is changed (``PATCHES`` records what happened). ``DIFFUS_NO_TAICHI_PATCH=1``
disables it.
"""
from __future__ import annotations

import logging
import os
import re
import textwrap

import taichi as ti

log = logging.getLogger(__name__)

ARCHS = {"cuda": ti.cuda, "vulkan": ti.vulkan, "cpu": ti.cpu}
AUTO_ORDER = ("cuda", "vulkan", "cpu")
ENV_VAR = "DIFFUS_ARCH"

_state = {"arch": None, "precision": None}

PATCHES: dict = {}             # name -> "applied" | why it was not applied
_PATCH_TAICHI_VERSION = (1, 7, 4)
_SPECIAL_WS = re.compile(r"[\t\n\x0b\x0c\r]")
_WRAP_DEFAULTS = {"expand_tabs": True, "replace_whitespace": True, "drop_whitespace": True,
                  "initial_indent": "", "subsequent_indent": "", "max_lines": None,
                  "fix_sentence_endings": False}


class _FastTextWrapper(textwrap.TextWrapper):
    """``TextWrapper`` with a fast path for text that fits on one line.

    For an ASCII string of at most ``width`` characters without tabs or other special
    whitespace and the default options, ``TextWrapper.wrap`` splits it into chunks that all fit
    on the first line, keeps the leading whitespace and drops the trailing run: the result is
    ``[text.rstrip(" ")]``, or ``[]`` when that is empty. Longer lines go to the standard
    ``wrap`` once per distinct text and option set (memoised: Taichi formats the same source line
    for every AST node on it and for every static unrolling). tests/test_startup_memory.py
    compares both wrappers on every line of the package."""

    _memo: dict = {}

    def wrap(self, text):
        if not all(getattr(self, k) == v for k, v in _WRAP_DEFAULTS.items()):
            return super().wrap(text)
        if len(text) <= self.width and text.isascii() and not _SPECIAL_WS.search(text):
            s = text.rstrip(" ")
            return [s] if s else []
        key = (self.width, self.break_long_words, self.break_on_hyphens, self.tabsize, text)
        got = self._memo.get(key)
        if got is None:
            if len(self._memo) > 100_000:
                self._memo.clear()
            got = self._memo[key] = tuple(super().wrap(text))
        return list(got)


def patch_taichi_pos_info() -> str:
    """Install :class:`_FastTextWrapper` in Taichi's AST transformer (see the module docstring);
    returns "applied", "already applied" or why it was left alone. Never raises."""
    if os.environ.get("DIFFUS_NO_TAICHI_PATCH", "") not in ("", "0"):
        PATCHES["pos_info_textwrap"] = "disabled by DIFFUS_NO_TAICHI_PATCH"
        return PATCHES["pos_info_textwrap"]
    try:
        from taichi.lang.ast import ast_transformer_utils as atu

        if tuple(ti.__version__) != _PATCH_TAICHI_VERSION:
            why = f"taichi {ti.__version__} is not {_PATCH_TAICHI_VERSION}"
        elif getattr(atu, "TextWrapper", None) is _FastTextWrapper:
            why = "already applied"
        elif (getattr(atu, "TextWrapper", None) is not textwrap.TextWrapper
              or not callable(getattr(getattr(atu, "ASTTransformerContext", None),
                                      "get_pos_info", None))):
            why = "taichi.lang.ast.ast_transformer_utils has an unexpected layout"
        else:
            atu.TextWrapper = _FastTextWrapper
            why = "applied"
    except Exception as e:  # noqa: BLE001 - a failed patch must never stop the simulator
        why = f"not applied ({type(e).__name__}: {e})"
    PATCHES["pos_info_textwrap"] = why
    log.debug("taichi get_pos_info text-wrap patch: %s", why)
    return why


patch_taichi_pos_info()


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
