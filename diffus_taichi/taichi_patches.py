"""Start-up patches for Taichi 1.7.4's kernel front end (applied when :mod:`.backend` is
imported; results, messages, debug info and offline-cache keys are unchanged).

Taichi turns every kernel's Python AST into its IR on the first call in each process, even when
the offline cache then supplies the compiled code, and it inlines every ``ti.func`` by reading
and parsing its source again at each call site. With a warm cache this front end was about half
of the time to the first frame. Five patches, each only on taichi 1.7.4 (pinned in
pyproject.toml) and only when the patched names have the expected layout (``PATCHES`` records
what happened to each; ``DIFFUS_NO_TAICHI_PATCH=1`` disables all):

- ``pos_info_textwrap``: for every AST node Taichi formats a source-position message
  (``ASTTransformerContext.get_pos_info``) with ``textwrap.TextWrapper``. The patch swaps the
  ``TextWrapper`` name in ``taichi.lang.ast.ast_transformer_utils`` for :class:`_FastTextWrapper`,
  whose ``wrap`` returns the identical list without the regex machinery for the common case.
- ``pos_info_memo``: ``get_pos_info`` memoised on everything its message depends on (file, line
  offset, function name, indent, the node's type and position, the first body line of compound
  statements, and the source lines it quotes): an inlined ``ti.func`` repeats the same nodes
  at every call site and static unrolling. A node on one source line of at most 80 plain
  characters (most of them) is formatted directly (:func:`_single_line_pos_info`, the same
  string) instead of by the original, whose per-call set-up dominated the first visit.
- ``source_memo``: ``getsourcefile`` / ``getsourcelines`` of ``taichi.lang.kernel_impl``
  memoised per function object (weakly referenced), so a ``ti.func`` inlined at N call sites
  is read from its file once instead of N times (tokenising the whole enclosing block each time).

- ``gc_paused_front_end``: ``Kernel.materialize`` (the front end of one kernel, with every
  inlined ``ti.func``) runs with Python's cyclic garbage collector paused (:func:`gc_paused`).
  The AST transform allocates ~10^5 short-lived objects (freed by reference counting), which
  set off collector passes over every live object, Taichi's and NumPy's included: a full
  (generation 2) pass cost ~25 ms inside the first frame's front end, ~45 ms of collection in
  all from import to the first frame. Paused, that work waits until the program allocates
  again after the kernel (nothing is leaked; the thresholds are unchanged).

- ``inside_class_frozen``: every ``ti.func`` / ``ti.kernel`` decoration asks
  ``kernel_impl._inside_class`` whether it sits in a class body by reading the source line of
  an outer frame with ``inspect.getframeinfo``. For a decoration at module level that frame is
  the import machinery's (``<frozen importlib._bootstrap>``), which has no source, so the answer
  is always False, but ``inspect`` first scans every loaded module for it (~0.6 ms per
  decoration; ~93 in ``import taichi``, ~100 more in this package and Taichi's lazily imported
  ``matrix_ops``). The patch answers False at once for a ``<...>`` file name that
  ``linecache`` does not hold (exactly when the original reads no line) and asks the original
  otherwise. It is installed by :func:`install_import_hook` (run first thing by the package's
  ``__init__``) as soon as ``taichi.lang.kernel_impl`` has been executed, so Taichi's own
  decorations during ``import taichi`` profit too; if Taichi was imported earlier it applies
  from then on.

tests/test_startup_memory.py compares each patched function with the original.
"""
from __future__ import annotations

import functools
import gc
import importlib.abc
import linecache
import logging
import os
import re
import sys
import textwrap
import weakref

log = logging.getLogger(__name__)

PATCHES: dict = {}             # name -> "applied" | why it was not applied
_PATCH_TAICHI_VERSION = (1, 7, 4)
_SPECIAL_WS = re.compile(r"[\t\n\x0b\x0c\r\x1c-\x1f]")   # str.strip() drops \x1c-\x1f too
_WRAP_DEFAULTS = {"expand_tabs": True, "replace_whitespace": True, "drop_whitespace": True,
                  "initial_indent": "", "subsequent_indent": "", "max_lines": None,
                  "fix_sentence_endings": False}
_MEMO_MAX = 200_000


class _FastTextWrapper(textwrap.TextWrapper):
    """``TextWrapper`` with a fast path for text that fits on one line.

    For an ASCII string of at most ``width`` characters without tabs or other special
    whitespace and the default options, ``TextWrapper.wrap`` splits it into chunks that all fit
    on the first line, keeps the leading whitespace and drops the trailing run: the result is
    ``[text.rstrip(" ")]``, or ``[]`` when that is empty. Longer lines go to the standard
    ``wrap`` once per distinct text and option set (memoised)."""

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
            if len(self._memo) > _MEMO_MAX:
                self._memo.clear()
            got = self._memo[key] = tuple(super().wrap(text))
        return list(got)


def _pos_info_key(ctx, node):
    """Everything ``ASTTransformerContext.get_pos_info(ctx, node)`` reads (taichi 1.7.4)."""
    lo, hi = node.lineno, node.end_lineno
    body = getattr(node, "body", None)
    b0 = body[0].lineno if isinstance(body, list) and body else None
    return (ctx.file, ctx.lineno_offset, ctx.indent, ctx.func.func.__name__,
            node.__class__.__name__, lo, node.col_offset, hi, node.end_col_offset, b0,
            tuple(ctx.src[lo - 1:max(hi, lo)]))


def _simple_line(text: str) -> bool:
    """True when ``TextWrapper(width=80).wrap(text)`` is ``[text.rstrip(" ")]`` (or ``[]``):
    the :class:`_FastTextWrapper` fast path."""
    return len(text) <= 80 and text.isascii() and not _SPECIAL_WS.search(text)


def _single_line_pos_info(ctx, node):
    """``get_pos_info``'s message for a node on one source line of at most 80 plain characters
    (taichi 1.7.4's f-string and ``gen_line`` with the wrapping of :class:`_FastTextWrapper`
    written out); None for anything else."""
    lo = node.lineno
    if lo != node.end_lineno:
        return None
    code = ctx.src[lo - 1]
    if not _simple_line(code):
        return None
    col = ctx.indent + node.col_offset
    hint = " " * col + "^" * (ctx.indent + node.end_col_offset - col)
    hint += " " * (len(code) - len(hint))
    if not _simple_line(hint):
        return None
    msg = f'File "{ctx.file}", line {lo + ctx.lineno_offset}, in {ctx.func.func.__name__}:\n'
    c, h = code.rstrip(" "), hint.rstrip(" ")
    if not c:
        return msg + "\n\n"
    return msg + (c + "\n" + h + "\n" if h else "")


def memoised_pos_info(original):
    """``get_pos_info`` with a memo keyed by :func:`_pos_info_key`; a node on one plain line
    is formatted by :func:`_single_line_pos_info` instead of the original."""
    memo: dict = {}

    def get_pos_info(self, node):
        try:
            key = _pos_info_key(self, node)
        except Exception:  # noqa: BLE001 - anything unexpected: the original, unmemoised
            return original(self, node)
        got = memo.get(key)
        if got is None:
            if len(memo) > _MEMO_MAX:
                memo.clear()
            try:
                got = _single_line_pos_info(self, node)
            except Exception:  # noqa: BLE001 - the original decides
                got = None
            if got is None:
                got = original(self, node)
            memo[key] = got
        return got

    get_pos_info.__wrapped__ = original
    get_pos_info._diffus_memo = memo
    return get_pos_info


def memoised_per_function(original):
    """``original(func)`` memoised per function object (weak keys; list results copied)."""
    memo = weakref.WeakKeyDictionary()

    def wrapper(obj):
        try:
            got = memo.get(obj)
        except TypeError:                       # not weak-referenceable: no memo
            return original(obj)
        if got is None:
            got = original(obj)
            try:
                memo[obj] = got
            except TypeError:
                pass
        if isinstance(got, tuple) and got and isinstance(got[0], list):
            return (list(got[0]),) + got[1:]    # getsourcelines: callers may not share the list
        return got

    wrapper.__wrapped__ = original
    wrapper._diffus_memo = memo
    return wrapper


def gc_paused(original):
    """``original`` (a method) run with Python's cyclic garbage collector paused, then
    restored to its previous state (also on an exception). Objects are freed by reference
    counting as usual; only the collector's passes wait until the call returns."""

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return original(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    wrapper._diffus_patch = True
    return wrapper


def apply_startup_patches() -> dict:
    """Apply the first four patches (see the module docstring; the fourth is
    :func:`install_import_hook`'s); returns ``PATCHES``. Never raises."""
    names = ("pos_info_textwrap", "pos_info_memo", "source_memo", "gc_paused_front_end")
    if os.environ.get("DIFFUS_NO_TAICHI_PATCH", "") not in ("", "0"):
        for n in names:
            PATCHES[n] = "disabled by DIFFUS_NO_TAICHI_PATCH"
        return PATCHES
    try:
        from taichi.lang import kernel_impl as ki
        from taichi.lang.ast import ast_transformer_utils as atu

        ctx_cls = getattr(atu, "ASTTransformerContext", None)
        pos = getattr(ctx_cls, "get_pos_info", None)
        import taichi as ti

        if tuple(ti.__version__) != _PATCH_TAICHI_VERSION:
            for n in names:
                PATCHES[n] = f"taichi {ti.__version__} is not {_PATCH_TAICHI_VERSION}"
            return PATCHES
        # 1. text wrapping inside get_pos_info
        if getattr(atu, "TextWrapper", None) is _FastTextWrapper:
            PATCHES["pos_info_textwrap"] = "already applied"
        elif getattr(atu, "TextWrapper", None) is not textwrap.TextWrapper or not callable(pos):
            PATCHES["pos_info_textwrap"] = "ast_transformer_utils has an unexpected layout"
        else:
            atu.TextWrapper = _FastTextWrapper
            PATCHES["pos_info_textwrap"] = "applied"
        # 2. get_pos_info memo
        if hasattr(pos, "_diffus_memo"):
            PATCHES["pos_info_memo"] = "already applied"
        elif not callable(pos):
            PATCHES["pos_info_memo"] = "ASTTransformerContext.get_pos_info not found"
        else:
            ctx_cls.get_pos_info = memoised_pos_info(pos)
            PATCHES["pos_info_memo"] = "applied"
        # 3. source of kernels and ti.funcs, read once per function
        fns = [getattr(ki, n, None) for n in ("getsourcefile", "getsourcelines")]
        if all(hasattr(f, "_diffus_memo") for f in fns):
            PATCHES["source_memo"] = "already applied"
        elif not all(callable(f) for f in fns) or not callable(getattr(ki, "_get_tree_and_ctx", None)):
            PATCHES["source_memo"] = "taichi.lang.kernel_impl has an unexpected layout"
        else:
            ki.getsourcefile, ki.getsourcelines = (memoised_per_function(f) for f in fns)
            PATCHES["source_memo"] = "applied"
        # 4. no garbage collection inside a kernel's front end
        mat = getattr(getattr(ki, "Kernel", None), "materialize", None)
        if getattr(mat, "_diffus_patch", False):
            PATCHES["gc_paused_front_end"] = "already applied"
        elif not callable(mat):
            PATCHES["gc_paused_front_end"] = "kernel_impl.Kernel.materialize not found"
        else:
            ki.Kernel.materialize = gc_paused(mat)
            PATCHES["gc_paused_front_end"] = "applied"
    except Exception as e:  # noqa: BLE001 - a failed patch must never stop the simulator
        for n in names:
            PATCHES.setdefault(n, f"not applied ({type(e).__name__}: {e})")
    log.debug("taichi start-up patches: %s", PATCHES)
    return PATCHES


# --- inside_class_frozen: installed before Taichi is imported ---------------------------------
_NO_PATCH_ENV = "DIFFUS_NO_TAICHI_PATCH"
_KERNEL_IMPL = "taichi.lang.kernel_impl"
_STOCK_GETLINES = linecache.getlines


def fast_inside_class(original):
    """``kernel_impl._inside_class`` that returns False at once when the frame it would read is
    in a ``<...>`` pseudo-file absent from ``linecache`` (the original's ``getframeinfo`` finds
    no source line there and returns False after scanning ``sys.modules``); else, or while
    someone has replaced ``linecache.getlines`` (doctest serves its examples that way), the
    original."""

    def _inside_class(level_of_class_stackframe):
        try:
            fn = sys._getframe(level_of_class_stackframe).f_code.co_filename
        except (ValueError, TypeError):        # no such frame: the original decides
            fn = ""
        if (fn[:1] == "<" and fn[-1:] == ">" and fn not in linecache.cache
                and linecache.getlines is _STOCK_GETLINES):
            return False
        return original(level_of_class_stackframe + 1)   # one frame deeper than its caller's

    _inside_class.__wrapped__ = original
    _inside_class._diffus_patch = True
    return _inside_class


def _patch_inside_class(ki) -> str:
    """Apply ``inside_class_frozen`` to the executed module ``ki`` (taichi.lang.kernel_impl)."""
    try:
        core = getattr(ki, "_ti_core", None)
        version = (core.get_version_major(), core.get_version_minor(), core.get_version_patch())
        if tuple(version) != _PATCH_TAICHI_VERSION:
            return f"taichi {version} is not {_PATCH_TAICHI_VERSION}"
        orig = getattr(ki, "_inside_class", None)
        if getattr(orig, "_diffus_patch", False):
            return "already applied"
        if not callable(orig) or not hasattr(ki, "_KERNEL_CLASS_STACKFRAME_STMT_RES"):
            return "taichi.lang.kernel_impl has an unexpected layout"
        ki._inside_class = fast_inside_class(orig)
        return "applied"
    except Exception as e:  # noqa: BLE001 - a failed patch must never stop the import
        return f"not applied ({type(e).__name__}: {e})"


class _KernelImplHook(importlib.abc.MetaPathFinder):
    """Import hook for ``taichi.lang.kernel_impl`` only: asks the finders after it for the spec
    and has its loader patch the module right after executing it (before the rest of
    ``import taichi``). It stays installed, inert for every other name, so a reload of the
    module is patched again; the loader override is removed after that module's execution."""

    def find_spec(self, name, path, target=None):
        if name != _KERNEL_IMPL:
            return None
        try:
            finders = sys.meta_path[sys.meta_path.index(self) + 1:]
        except ValueError:
            return None
        try:
            for finder in finders:
                find = getattr(finder, "find_spec", None)
                spec = find(name, path, target) if find is not None else None
                if spec is not None:
                    break
            else:
                return None
        except Exception:  # noqa: BLE001 - let the import system ask the finders itself
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None or "exec_module" in getattr(loader, "__dict__", {}):
            return spec                        # unexpected loader: the import as it would be

        def exec_and_patch(module):
            try:
                exec_module(module)
            finally:
                try:
                    del loader.exec_module     # only this module's execution is wrapped
                except AttributeError:
                    pass
            if getattr(module, "__name__", None) == _KERNEL_IMPL:
                PATCHES["inside_class_frozen"] = _patch_inside_class(module)

        try:
            loader.exec_module = exec_and_patch
        except (AttributeError, TypeError):   # a loader without an instance dict
            pass
        return spec


def install_import_hook() -> None:
    """Install ``inside_class_frozen`` (see the module docstring): patch kernel_impl now if Taichi
    is already imported, and (again) whenever it is executed. Needs no Taichi import itself;
    never raises."""
    if os.environ.get(_NO_PATCH_ENV, "") not in ("", "0"):
        PATCHES["inside_class_frozen"] = f"disabled by {_NO_PATCH_ENV}"
        return
    try:
        ki = sys.modules.get(_KERNEL_IMPL)
        if ki is not None:
            PATCHES["inside_class_frozen"] = _patch_inside_class(ki)
        if not any(isinstance(f, _KernelImplHook) for f in sys.meta_path):
            sys.meta_path.insert(0, _KernelImplHook())
    except Exception as e:  # noqa: BLE001
        PATCHES["inside_class_frozen"] = f"not applied ({type(e).__name__}: {e})"
