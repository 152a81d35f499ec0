"""Storage of the acoustic-property volume: how a Simulator holds ``props`` and whether it keeps
a full-size Taichi copy of the channels.

``Simulator(storage=...)``:

* ``"full"``: a Taichi field of all C channels (``sim.vol``) plus ``props`` at the Simulator's
  precision, computed from ``sim.vol`` by ``march.acoustic_volume`` / the MLP kernel. Needed to
  differentiate w.r.t. the mapping (the Tape records that kernel), so ``requires_grad=True``
  and ``precision="f64"`` always use it. Memory: (C + 3) x 4 bytes per voxel (f32).
* ``"lean"``: ``props`` at the Simulator's precision, computed straight from the NumPy channels
  (``volume.channels``) slab by slab (:func:`fill_props`), no channel field (``sim.vol`` is
  None). Identical ``props`` values (same per-voxel arithmetic); 12 bytes per voxel (f32).
* ``"compact"``: as lean, but ``props`` stored as float16 (the kernels read any dtype and
  compute in f32): 6 bytes per voxel, rounding the properties to 11 significant bits (relative
  error <= 2^-11 of each deviation from the reference impedance, attenuation and scattering).
  With a ``tissue`` or ``transfer`` mapping, ``props`` also covers only the bounding box of the
  voxels whose used channels are non-zero (:func:`content_box`; ``sim.props_origin`` is its
  first voxel, ``sim.w2v`` maps world mm to indices of this box): the voxels left out map to
  the background row/knot, which is also the ``outside`` value that the march reads beyond the
  box, so the image is unchanged as long as ``outside`` stays that background (every set-up
  path here keeps it so; :meth:`Simulator.set_outside` warns otherwise).
* ``"auto"`` (default): ``full`` with ``requires_grad=True`` or f64, else ``compact`` for volumes
  of at least :data:`AUTO_COMPACT_VOXELS` voxels (256^3), else ``lean``.

A lean/compact Simulator recomputes ``props`` from ``volume.channels`` whenever the mapping
changes (``upload_mapping``, ``set_mapping_params``): on CPU the NumPy array is read in place
(zero copy); on GPU backends each slab (<= :data:`SLAB_BYTES`) is copied to the device per
update, so a mapping search that updates many times on a GPU may prefer ``storage="full"``.

No ``from __future__ import annotations`` here: the module holds Taichi kernels.
"""
import logging

import numpy as np
import taichi as ti

from .march import channels_to_props
from .volume import u8_lut

log = logging.getLogger(__name__)

STORAGES = ("auto", "full", "lean", "compact")
AUTO_COMPACT_VOXELS = 1 << 24          # 256^3: compact props from this size up (auto)
SLAB_BYTES = 32 << 20                  # channel bytes per launch on GPU backends


def resolve_storage(storage, precision: str, requires_grad, n_voxels: int) -> str:
    """The storage a Simulator uses (see the module doc); ValueError for impossible choices."""
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    if storage == "auto":
        if requires_grad is True or precision == "f64":
            return "full"
        return "compact" if n_voxels >= AUTO_COMPACT_VOXELS else "lean"
    if storage != "full" and requires_grad is True:
        raise ValueError(f"storage={storage!r} keeps no channel field, so it cannot give "
                         "mapping gradients: use storage='full' (or 'auto') with "
                         "requires_grad=True")
    if storage == "compact" and precision == "f64":
        raise ValueError("storage='compact' (float16 properties) is for precision 'f32'")
    return storage


def props_dtype(storage: str, real):
    return ti.f16 if storage == "compact" else real


def bytes_per_voxel(storage: str, n_channels: int, precision: str = "f32") -> int:
    """Taichi field bytes per voxel of the property volume (and channel field, ``full``)."""
    r = 8 if precision == "f64" else 4
    return {"full": (n_channels + 3) * r, "lean": 3 * r, "compact": 6}[storage]


@ti.kernel
def props_from_channels(ch: ti.types.ndarray(ndim=4), x0: int, y0: int, z0: int,
                        n_ch: ti.template(), table: ti.template(), chan_tissue: ti.template(),
                        tf: ti.template(), tf_chan: ti.template(), props: ti.template(),
                        lut: ti.types.ndarray(ndim=1), levels: ti.template()):
    """props[x0 + i, j, k] = the mapping of channels ch[i, y0 + j, z0 + k, :] (ch: an X slab;
    j, k over props.shape[1:]): the arithmetic of ``march.acoustic_volume`` voxel for voxel,
    cast to the dtype of ``props``. levels (static): ch holds uint8 levels whose channel value
    is lut[level] (volume.U8Channels: a quarter of the memory traffic, same values).
    Rows (i, j) in parallel, k serial: on CPU 2.5x faster than a parallel loop over every voxel
    (no index division per voxel; the built-in brain: ~80 -> ~32 ms)."""
    for ij in range(ch.shape[0] * props.shape[1]):
        i, j = ij // props.shape[1], ij % props.shape[1]
        for k in range(props.shape[2]):
            c = ti.Vector([lut[ti.cast(ch[i, y0 + j, z0 + k, q], ti.i32)] if ti.static(levels)
                           else ti.cast(ch[i, y0 + j, z0 + k, q], float) for q in ti.static(range(n_ch))])
            prop = channels_to_props(c, n_ch, table, chan_tissue, tf, tf_chan)
            props[x0 + i, j, k] = ti.cast(prop, props.dtype)


def slab_rows(shape, n_channels: int, itemsize: int = 4, arch: str = "cpu") -> int:
    """X rows per launch: all of them on CPU (the NumPy array is passed in place), else as
    many as fit in :data:`SLAB_BYTES`."""
    X, Y, Z = (int(s) for s in shape)
    if arch == "cpu":
        return X
    return int(max(1, min(X, SLAB_BYTES // max(1, Y * Z * n_channels * itemsize))))


def content_box(volume, mapping, chan_tissue=None):
    """(lo, hi) voxel index bounds (hi exclusive) of the voxels whose mapped properties can
    differ from the background (the mapping of all-zero channels): intensity > 0 for a
    ``transfer`` mapping, any tissue channel (``chan_tissue`` >= 0) != 0 for ``tissue``; None for
    ``mlp`` (its background is not the outside value) or when nothing differs. Read slab by
    slab (no full-size temporary)."""
    ch = volume.uint8_channels                 # levels: > 0 and != 0 as their float values
    ch = volume.channels if ch is None else ch
    if mapping.kind == "transfer":
        cols = [volume.intensity_index]
    elif mapping.kind == "tissue":
        if chan_tissue is None:
            chan_tissue = mapping.table_arrays(volume)[1]
        cols = [c for c, t in enumerate(chan_tissue) if t >= 0]
    else:
        return None
    X, Y, Z = ch.shape[:3]
    ax, ay, az = np.zeros(X, bool), np.zeros(Y, bool), np.zeros(Z, bool)
    step = max(1, (1 << 22) // max(1, Y * Z))
    for a in range(0, X, step):
        sl = ch[a:a + step]
        m = np.zeros(sl.shape[:3], bool)
        for c in cols:
            m |= (sl[..., c] > 0) if mapping.kind == "transfer" else (sl[..., c] != 0)
        ax[a:a + step] = m.any(axis=(1, 2))
        ay |= m.any(axis=(0, 2))
        az |= m.any(axis=(0, 1))
    if not ax.any():
        return None
    lo = tuple(int(np.argmax(v)) for v in (ax, ay, az))
    hi = tuple(int(len(v) - np.argmax(v[::-1])) for v in (ax, ay, az))
    return lo, hi


def fill_props(sim) -> None:
    """Compute ``sim.props`` from ``sim.volume.channels`` and the mapping fields, slab by slab
    along X (lean / compact storage; over ``sim.props_origin`` + ``props.shape``)."""
    vol = sim.volume
    if sim.mapping.kind != "mlp":
        u8 = vol.uint8_channels                      # levels, when the float32 are not made
        ch = u8 if u8 is not None else vol.channels
        if not ch.flags.c_contiguous:
            ch = np.ascontiguousarray(ch)
        lut = u8_lut(sim._np_real)
        rows = slab_rows(ch.shape[:3], ch.shape[3], ch.itemsize, sim.arch)
        (ox, oy, oz), (nx, _, _) = sim.props_origin, sim.props.shape
        for a in range(0, nx, rows):
            slab = ch[ox + a:ox + min(nx, a + rows)]
            if sim.arch != "cpu" and not slab.flags.writeable:
                slab = slab.copy()     # GPU launchers copy NumPy arguments back after a launch
            props_from_channels(slab, a, oy, oz, ch.shape[3], sim.table, sim.chan_tissue,
                                sim.tf, sim.tf_chan, sim.props, lut, u8 is not None)
        return
    ch = vol.channels
    if not ch.flags.c_contiguous:
        ch = np.ascontiguousarray(ch)
    rows = slab_rows(ch.shape[:3], ch.shape[3], ch.itemsize, sim.arch)
    X = ch.shape[0]
    if sim.props_origin != (0, 0, 0) or tuple(sim.props.shape) != tuple(ch.shape[:3]):
        raise RuntimeError("internal: an MLP mapping needs the uncropped property volume")
    from .mlp_mapping import mlp_kernel_nd

    k = mlp_kernel_nd(sim.mapping.mlp)
    c = vol.intensity_index
    for a in range(0, X, rows):
        b = min(X, a + rows)
        s0, s1 = max(a - 1, 0), min(b + 1, X)          # one halo row each side
        k(ch[s0:s1], s0, a, b - a, X, c, sim.gradT, sim.mlp_w, sim.props)
