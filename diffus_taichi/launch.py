"""Per-frame kernel launches without Taichi's per-call Python work.

Taichi 1.7.4's ``Kernel.__call__`` does, at every launch, in Python: it re-extracts a template
key from every argument (an ``isinstance`` chain per argument, tuples recursively), looks the
instance up, then walks every argument again to fill the launch context. For the fused render
kernels (30-40 arguments, most of them fields) that was 0.15-0.27 ms of a ~3 ms CPU frame,
with the kernels themselves unchanged.

:func:`fast_call` launches the same compiled instance as ``kernel(*args)`` would: the first
call for a combination of template arguments (by identity: the objects are held, so their ids
stay theirs) and array dtypes/ranks goes through Taichi's own ``__call__`` (front end, offline
cache, compile) and records which argument goes into which launch-context slot; later calls
fill only the scalar and array slots and launch. It falls back to the plain call where a
``ti.ad.Tape`` would record the launch (outside a ``ti.ad.grad_replaced`` function) and under
forward-mode AD, for kernels with return values or
argument kinds it does not handle, and where the Taichi internals it uses are absent (only
taichi 1.7.4 is supported: pyproject.toml pins it). ``DIFFUS_NO_FAST_LAUNCH=1`` disables it.
"""
from __future__ import annotations

import logging
import os

import numpy as np

log = logging.getLogger(__name__)


def _ndarray_type():
    try:
        from taichi.lang._ndarray import Ndarray
        return Ndarray
    except ImportError:                      # never matched: such arguments launch plainly
        return type("_NoNdarray", (), {})


_NDARRAY = _ndarray_type()


def _autodiff_none():
    try:
        from taichi.lang.enums import AutodiffMode
        return AutodiffMode.NONE
    except ImportError:
        return object()                      # never equal: plain launches


_NONE = _autodiff_none()

_ENABLED = os.environ.get("DIFFUS_NO_FAST_LAUNCH", "") in ("", "0")
_F, _I, _ARR = 0, 1, 2                 # slot kinds: float, int, array (NumPy or ti.ndarray)


class _Instance:
    """One compiled kernel instance and the launch-context slot of each non-template argument."""

    __slots__ = ("t_kernel", "slots", "held", "prog")

    def __init__(self, t_kernel, slots, held, prog):
        self.t_kernel, self.slots, self.held, self.prog = t_kernel, slots, held, prog


def _plan(kernel, args):
    """(template positions, [(position, slot, kind)]) of a Kernel's arguments, or None if an
    argument kind is not handled here (those launches stay plain)."""
    from taichi.lang.util import cook_dtype
    from taichi.types import ndarray_type, primitive_types
    from taichi.types.annotations import template
    from taichi.types.utils import is_signed

    if kernel.return_type is not None or getattr(kernel, "has_print", True):
        return None
    tpl, slots = [], []
    n_tpl = 0
    for i, (meta, v) in enumerate(zip(kernel.arguments, args)):
        ann = meta.annotation
        if isinstance(ann, template):
            tpl.append(i)
            n_tpl += 1
            continue
        slot = (i - n_tpl,)
        if id(ann) in primitive_types.real_type_ids:
            kind = _F
        elif id(ann) in primitive_types.integer_type_ids and is_signed(cook_dtype(ann)):
            kind = _I
        elif isinstance(ann, ndarray_type.NdarrayType):
            if ann.dtype is not None and id(ann.dtype) not in primitive_types.type_ids:
                return None                  # vector/matrix elements: not needed here
            kind = _ARR
        else:
            return None
        slots.append((i, slot, kind))
    return tuple(tpl), tuple(slots)


_VALUE_TYPES = (int, float, bool, str, type(None))
_MAX_INSTANCES = 64


def _key(tpl, slots, args):
    """Template arguments by value (Python scalars) or identity (fields and other objects, held
    by the instance), plus the dtype / rank of the array arguments."""
    k = [(type(v), v) if type(v) in _VALUE_TYPES else id(v) for v in (args[i] for i in tpl)]
    for i, _, kind in slots:
        v = args[i]
        if kind != _ARR:
            continue
        if isinstance(v, np.ndarray):
            if not v.flags.c_contiguous:
                return None                  # Taichi copies or rejects it: a plain launch
            k.append((v.dtype, v.ndim))
        elif isinstance(v, _NDARRAY):
            k.append((id(v.dtype), len(v.shape), v.grad is not None))
        else:
            return None                      # e.g. a torch tensor: a plain launch
    return tuple(k)


def fast_call(kernel, *args):
    """``kernel(*args)`` (a ``@ti.kernel`` function, positional arguments only) with the
    per-launch Python work cut to setting the scalar and array arguments (module docstring)."""
    from taichi.lang import impl

    rt = impl.get_runtime()
    prim = getattr(kernel, "_primal", None)
    if (not _ENABLED or (rt.target_tape is not None and not rt.grad_replaced)
            or rt.fwd_mode_manager is not None or prim is None
            or prim.autodiff_mode != _NONE or len(args) != len(prim.arguments)):
        return kernel(*args)
    cache = getattr(kernel, "_diffus_fast", None)
    plan = cache["plan"] if cache is not None else None
    if plan is not None:
        tpl, slots = plan
        key = _key(tpl, slots, args)
        inst = cache.get(key) if key is not None else None
        if inst is not None and inst.prog is rt.prog:
            _launch(rt.prog, inst.t_kernel, slots, args)
            return None
    elif cache is not None:                             # a kernel this module does not handle
        return kernel(*args)
    out = kernel(*args)                                 # front end / cache / compile + launch
    if cache is None:
        try:
            plan = _plan(prim, args)                    # after materialize: has_print is known
        except (AttributeError, ImportError, TypeError) as e:   # other Taichi internals
            log.debug("fast_call: plain launches for %s (%s)", prim.func.__name__, e)
            plan = None
        cache = kernel._diffus_fast = {"plan": plan}
    key = _key(*plan, args) if plan is not None else None
    if key is not None:
        tpl, slots = plan
        ckey = prim.ensure_compiled(*args)              # the instance that launch used
        if len(cache) > _MAX_INSTANCES:
            cache.clear()
            cache["plan"] = plan
        cache[key] = _Instance(prim.compiled_kernels[ckey], slots, tuple(args[i] for i in tpl),
                               rt.prog)
    return out


def _launch(prog, t_kernel, slots, args):
    """Fill the scalar / array slots of a new launch context and launch (as
    ``Kernel.launch_kernel`` does for these argument kinds)."""
    ctx = t_kernel.make_launch_context()
    for i, slot, kind in slots:
        v = args[i]
        if kind == _F:
            ctx.set_arg_float(slot, float(v))
        elif kind == _I:
            ctx.set_arg_int(slot, int(v))
        elif isinstance(v, np.ndarray):                 # C-contiguous (_key)
            ctx.set_arg_external_array_with_shape(slot, int(v.ctypes.data), v.nbytes, v.shape, 0)
        elif v.grad is None:
            ctx.set_arg_ndarray(slot, v.arr)
        else:
            ctx.set_arg_ndarray_with_grad(slot, v.arr, v.grad.arr)
    prog.launch_kernel(prog.compile_kernel(prog.config(), prog.get_device_caps(), t_kernel), ctx)
