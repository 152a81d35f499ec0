"""Fill several Taichi fields from NumPy arrays in one kernel launch; clear every gradient in
one launch (:func:`clear_all_gradients`).

``field.from_numpy`` compiles (or, with a warm offline cache, still parses and loads) one kernel
per destination field, because the field is a template argument: a Simulator with ~15 small
static fields paid ~15 kernel preparations at start-up. :class:`Uploader` packs the arrays of a
fixed group of fields into one float and one int32 buffer and writes every field in a single
kernel (one preparation per group), with the same values as ``from_numpy`` (the arrays are cast
to the field dtype in NumPy first, as ``from_numpy`` callers here always did).

No ``from __future__ import annotations`` here: the module holds a Taichi kernel.
"""
import numpy as np
import taichi as ti
from taichi.lang.expr import Expr
from taichi.lang.field import ScalarField
from taichi.lang.matrix import MatrixField

from .launch import fast_call

_INT_TYPES = (ti.i8, ti.i16, ti.i32, ti.i64, ti.u8, ti.u16, ti.u32, ti.u64)


def _np_dtype(dt):
    return {ti.f16: np.float16, ti.f32: np.float32, ti.f64: np.float64, ti.i32: np.int32}.get(dt)


@ti.kernel
def _fill(dsts: ti.template(), meta: ti.template(), n_max: ti.template(),
          fbuf: ti.types.ndarray(ndim=1), ibuf: ti.types.ndarray(ndim=1)):
    """meta[d] = (is_int, n, m, offset, strides, size): field d has n x m components per
    element (1 x 1 scalar, n x 1 vector, n x m matrix), ``size`` elements with row-major
    strides, and its values start at ``offset`` of ``ibuf`` (is_int) or ``fbuf``. One parallel
    loop over the largest field (n_max elements) writes element i of every field that has one:
    a single task, because Taichi prepares each task of a kernel separately (~10 ms apiece on
    the CPU backend even from the offline cache: one loop per field cost ~100 ms at start-up)."""
    for i in range(n_max):
        for d in ti.static(range(len(dsts))):
            f = ti.static(dsts[d])
            isint, n, m, off, strides, size = ti.static(*meta[d])
            buf = ti.static(ibuf if isint else fbuf)
            mat = ti.static(f.__class__.__name__ == "MatrixField")
            mat2 = ti.static(mat and m > 1)                           # else a vector field
            if i < size:
                base = off + i * (n * m)
                # vector / matrix components in a run-time loop: one copy of the code per
                # field instead of one per component (the kernel's front end is Python work
                # at every start-up, proportional to the code it builds)
                if ti.static(len(strides) == 0):                     # 0-D field
                    if ti.static(mat):
                        for c in range(n * m):
                            if ti.static(mat2):
                                f[None][c // m, c % m] = ti.cast(buf[base + c], f.dtype)
                            else:
                                f[None][c] = ti.cast(buf[base + c], f.dtype)
                    else:
                        f[None] = ti.cast(buf[base], f.dtype)
                else:
                    I = ti.Vector([(i // strides[k]) % f.shape[k]
                                   for k in ti.static(range(len(strides)))])
                    if ti.static(mat):
                        for c in range(n * m):
                            if ti.static(mat2):
                                f[I][c // m, c % m] = ti.cast(buf[base + c], f.dtype)
                            else:
                                f[I][c] = ti.cast(buf[base + c], f.dtype)
                    else:
                        f[I] = ti.cast(buf[base], f.dtype)


class Uploader:
    """``Uploader([f1, f2, ...])(a1, a2, ...)``: fi.from_numpy(ai) for all i in one launch.

    Arrays may be any numeric dtype; they are cast to each field's dtype in NumPy (``astype``,
    like ``from_numpy`` of a pre-cast array) and must have the field's full shape (element shape
    appended for vector/matrix fields). Float fields of one group must share one dtype."""

    def __init__(self, fields):
        self.fields = tuple(fields)
        meta, self._shapes, self._int = [], [], []
        fo = io = 0
        fdt = set()
        for f in self.fields:
            shape = tuple(f.shape)
            if isinstance(f, MatrixField):
                n, m = int(f.n), int(f.m)
                el = (n,) if getattr(f, "ndim", 2) == 1 else (n, m)
            else:
                n, m, el = 1, 1, ()
            isint = f.dtype in _INT_TYPES
            if isint and f.dtype != ti.i32:
                raise TypeError(f"Uploader: integer fields must be i32, got {f.dtype}")
            if not isint:
                fdt.add(f.dtype)
            strides, s = [], 1
            for d in reversed(shape):
                strides.insert(0, s)
                s *= int(d)
            size = s * n * m
            meta.append((int(isint), n, m, io if isint else fo, tuple(strides), s))
            if isint:
                io += size
            else:
                fo += size
            self._shapes.append(shape + el)
            self._int.append(isint)
        if len(fdt) > 1:
            raise TypeError(f"Uploader: float fields of one group must share a dtype, got {fdt}")
        self._fdtype = _np_dtype(fdt.pop()) if fdt else np.float32
        if self._fdtype is None:
            raise TypeError("Uploader: unsupported float field dtype")
        self.meta = tuple(meta)
        self._n_max = max(mt[5] for mt in meta)
        self._fbuf = np.zeros(max(fo, 1), self._fdtype)
        self._ibuf = np.zeros(max(io, 1), np.int32)

    def __call__(self, *arrays) -> None:
        if len(arrays) != len(self.fields):
            raise ValueError(f"Uploader: {len(self.fields)} fields but {len(arrays)} arrays")
        fb, ib = self._fbuf, self._ibuf
        for a, shape, isint, (_, n, m, off, _, _) in zip(arrays, self._shapes, self._int, self.meta):
            a = np.asarray(a)
            if a.shape != shape:
                raise ValueError(f"Uploader: array shape {a.shape} != field shape {shape}")
            size = int(np.prod(shape, dtype=np.int64))
            (ib if isint else fb)[off:off + size] = a.astype(ib.dtype if isint else fb.dtype,
                                                             copy=False).reshape(-1)
        _fill(self.fields, self.meta, self._n_max, fb, ib)


@ti.kernel
def _clear_groups(groups: ti.template(), shapes: ti.template()):
    """Zero every place of every group (a group: the places under one SNode, of one shape; a
    range-for over the shape: cheaper on CPU than the struct-for of ti.ad.clear_all_gradients)."""
    for g in ti.static(range(len(groups))):
        if ti.static(len(shapes[g]) == 0):                   # 0-D fields
            for s in ti.static(groups[g]):
                ScalarField(Expr(s))[None] = ti.cast(0, s.get_dt())
        else:
            for I in ti.grouped(ti.ndrange(*shapes[g])):
                for s in ti.static(groups[g]):
                    ScalarField(Expr(s))[I] = ti.cast(0, s.get_dt())


_CLEAR_MEMO: dict = {}


def _clear_args() -> tuple:
    """:func:`_clear_groups`' arguments (places by shape, shapes) for the adjoint places of every
    field with a gradient (grouped by parent SNode: exactly what ``ti.ad.clear_all_gradients``
    visits), or () if there are none. Memoised on the program and the ids of the finalized
    SNode-tree roots (a new or destroyed tree changes the key); the same tuples each time, which
    is launch.fast_call's key."""
    from taichi import _snode
    from taichi.lang.enums import SNodeGradType
    from taichi.lang.snode import SNode

    roots = _snode.FieldsBuilder._finalized_roots()
    key = (id(ti.lang.impl.get_runtime().prog), tuple(int(r.ptr.id) for r in roots))
    got = _CLEAR_MEMO.get(key)
    if got is not None:
        return got
    groups = []

    def visit(node):
        places = []
        for i in range(node.ptr.get_num_ch()):
            ch = node.ptr.get_ch(i)
            if not ch.is_place():
                visit(SNode(ch))
            elif ch.get_snode_grad_type() == SNodeGradType.ADJOINT:
                places.append(ch.get_expr())
        if places:
            groups.append(tuple(places))

    for root in roots:
        visit(root)
    by_shape: dict = {}                   # one loop (one task) per shape, not per SNode
    for g in groups:
        by_shape.setdefault(tuple(ScalarField(Expr(g[0])).shape), []).extend(g)
    if len(_CLEAR_MEMO) > 64:
        _CLEAR_MEMO.clear()
    got = _CLEAR_MEMO[key] = ((tuple(tuple(v) for v in by_shape.values()), tuple(by_shape))
                              if by_shape else ())
    return got


def clear_all_gradients() -> None:
    """``ti.ad.clear_all_gradients()`` (the same fields) in one kernel launch of range-for loops,
    one per field shape, instead of one struct-for kernel per field: 4.2 instead of 5.9 ms for
    a Simulator with pose gradients on the 2-vCPU CPU backend. Use with
    ``ti.ad.Tape(loss, clear_gradients=False)``."""
    try:
        ti.lang.impl.get_runtime().materialize()
        args = _clear_args()              # Taichi internals (pinned 1.7.4): fall back if absent
    except (AttributeError, ImportError):
        ti.ad.clear_all_gradients()
        return
    if args:
        fast_call(_clear_groups, *args)
