"""Start-up patches for Taichi 1.7.4's kernel front end (applied when :mod:`.backend` is
imported; results, messages, debug info and offline-cache keys are unchanged).

Taichi turns every kernel's Python AST into its IR on the first call in each process, even when
the offline cache then supplies the compiled code, and it inlines every ``ti.func`` by reading
and parsing its source again at each call site. With a warm cache this front end was about half
of the time to the first frame. Three patches, each only on taichi 1.7.4 (pinned in
pyproject.toml) and only when the patched names have the expected layout (``PATCHES`` records
what happened to each; ``DIFFUS_NO_TAICHI_PATCH=1`` disables all):

- ``pos_info_textwrap``: for every AST node Taichi formats a source-position message
  (``ASTTransformerContext.get_pos_info``) with ``textwrap.TextWrapper``. The patch swaps the
  ``TextWrapper`` name in ``taichi.lang.ast.ast_transformer_utils`` for :class:`_FastTextWrapper`,
  whose ``wrap`` returns the identical list without the regex machinery for the common case.
- ``pos_info_memo``: ``get_pos_info`` memoised on everything its message depends on (file, line
  offset, function name, indent, the node's type and position, the first body line of compound
  statements, and the source lines it quotes): an inlined ``ti.func`` repeats the same nodes
  at every call site and static unrolling.
- ``source_memo``: ``getsourcefile`` / ``getsourcelines`` of ``taichi.lang.kernel_impl``
  memoised per function object (weakly referenced), so a ``ti.func`` inlined at N call sites
  is read from its file once instead of N times (tokenising the whole enclosing block each time).

tests/test_startup_memory.py compares each patched function with the original.
"""
from __future__ import annotations

import logging
import os
import re
import textwrap
import weakref

import taichi as ti

log = logging.getLogger(__name__)

PATCHES: dict = {}             # name -> "applied" | why it was not applied
_PATCH_TAICHI_VERSION = (1, 7, 4)
_SPECIAL_WS = re.compile(r"[\t\n\x0b\x0c\r]")
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


def memoised_pos_info(original):
    """``get_pos_info`` with a memo keyed by :func:`_pos_info_key`."""
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
            got = memo[key] = original(self, node)
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


def apply_startup_patches() -> dict:
    """Apply the three patches (see the module docstring); returns ``PATCHES``. Never raises."""
    names = ("pos_info_textwrap", "pos_info_memo", "source_memo")
    if os.environ.get("DIFFUS_NO_TAICHI_PATCH", "") not in ("", "0"):
        for n in names:
            PATCHES[n] = "disabled by DIFFUS_NO_TAICHI_PATCH"
        return PATCHES
    try:
        from taichi.lang import kernel_impl as ki
        from taichi.lang.ast import ast_transformer_utils as atu

        ctx_cls = getattr(atu, "ASTTransformerContext", None)
        pos = getattr(ctx_cls, "get_pos_info", None)
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
    except Exception as e:  # noqa: BLE001 - a failed patch must never stop the simulator
        for n in names:
            PATCHES.setdefault(n, f"not applied ({type(e).__name__}: {e})")
    log.debug("taichi start-up patches: %s", PATCHES)
    return PATCHES
