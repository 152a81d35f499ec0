"""Volumes in world millimetres: NIfTI loading (any spacing and orientation, oblique affines
included) and the registry of built-in volumes chosen by name.

A :class:`Volume` holds C channels on a voxel grid (X, Y, Z) and the 4x4 affine that maps voxel
indices (i, j, k, 1) to world mm. A channel named ``intensity`` is MRI intensity normalised to
[0, 1]; every other channel is the volume fraction (0..1) of the tissue of that name in the tissue
table. Whatever fraction the tissue channels leave is the background tissue (coupling water).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .pose import Pose

log = logging.getLogger(__name__)

INTENSITY = "intensity"
MAX_VOXELS = 1 << 30          # 1 G voxels: beyond this a single channel exceeds 4 GB
MIN_DIM = 2


class U8Channels:
    """uint8 channels (X, Y, Z, C) standing for the float32 channels u8 / 255 (bit for bit
    ``u8.astype(np.float32) / np.float32(255)``). ``Volume(U8Channels(u8), ...)`` defers that
    float32 array (4x the memory; ~0.1 s to build for the built-in brain) until
    ``volume.channels`` is first read; the acoustic-property kernels read the uint8 array
    directly (:attr:`Volume.uint8_channels`), so a render never builds it."""

    def __init__(self, array: np.ndarray):
        self.array = array


def u8_lut(dtype=np.float32) -> np.ndarray:
    """(256,) the float32 value of each uint8 level as :class:`U8Channels` defines it (v / 255
    in float32), as ``dtype``."""
    return (np.arange(256, dtype=np.float32) / np.float32(255.0)).astype(dtype)


@dataclass
class Volume:
    """C-channel voxel volume. channels: (X, Y, Z, C) float32; affine: (4, 4) voxel -> world mm.

    ``channels`` may be given as :class:`U8Channels` (uint8 levels of v / 255): the float32
    array is then made on first access (:attr:`uint8_channels` holds the levels until then;
    ``repr``, ``==``, ``dataclasses.replace`` and, without a ``default_pose``,
    :func:`default_pose_for` read it too). Assigning ``channels`` drops the levels."""

    def __setattr__(self, name, value):
        if name == "channels" and self.__dict__.get("_u8") is not None:
            self.__dict__["_u8"] = None               # the assigned array rules from now on
        object.__setattr__(self, name, value)

    channels: np.ndarray
    affine: np.ndarray
    channel_names: tuple
    name: str = "volume"
    default_pose: Pose | None = None
    labels: np.ndarray | None = None          # optional integer label map (X, Y, Z)
    label_names: tuple = ()
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.channels, U8Channels):
            self._init_u8(self.channels.array)
            return
        ch = np.asarray(self.channels)
        if ch.ndim == 3:
            ch = ch[..., None]
        if ch.ndim != 4:
            raise ValueError(f"volume {self.name!r}: channels must be (X, Y, Z[, C]), got shape {ch.shape}")
        _check_shape(ch.shape[:3], self.name)
        self.channels = np.ascontiguousarray(ch, dtype=np.float32)
        self.channel_names = tuple(self.channel_names)
        if len(self.channel_names) != self.channels.shape[3]:
            raise ValueError(f"volume {self.name!r}: {self.channels.shape[3]} channels but "
                             f"{len(self.channel_names)} channel names")
        if not _all_finite(self.channels):
            raise ValueError(f"volume {self.name!r}: channels contain NaN or Inf")
        self.affine = _check_affine(self.affine, self.name)
        if self.default_pose is None:
            self.default_pose = default_pose_for(self)

    def _init_u8(self, u8) -> None:
        u8 = np.asarray(u8)
        if u8.dtype != np.uint8 or u8.ndim != 4:
            raise ValueError(f"volume {self.name!r}: U8Channels needs a uint8 (X, Y, Z, C) array, "
                             f"got {u8.dtype} shape {u8.shape}")
        _check_shape(u8.shape[:3], self.name)
        self.channel_names = tuple(self.channel_names)
        if len(self.channel_names) != u8.shape[3]:
            raise ValueError(f"volume {self.name!r}: {u8.shape[3]} channels but "
                             f"{len(self.channel_names)} channel names")
        del self.__dict__["channels"]                 # made by __getattr__ on first access
        self.__dict__["_u8"] = np.ascontiguousarray(u8)
        self.affine = _check_affine(self.affine, self.name)
        if self.default_pose is None:
            self.default_pose = default_pose_for(self)

    def __getattr__(self, name):
        d = self.__dict__
        if name == "channels" and d.get("_u8") is not None:
            u8 = d["_u8"]
            ch = np.empty(u8.shape, dtype=np.float32)
            ch[...] = u8
            ch /= np.float32(255.0)                      # == u8_lut()[u8], bit for bit
            d["channels"], d["_u8"] = ch, None           # from now on the float32 array rules
            log.debug("volume %r: float32 channels made from uint8 (%.0f MB)", self.name,
                      ch.nbytes / 2 ** 20)
            return ch
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def uint8_channels(self) -> np.ndarray | None:
        """The uint8 levels (X, Y, Z, C) of a :class:`U8Channels` volume whose float32
        ``channels`` have not been made yet (float value = :func:`u8_lut` [level]); else None."""
        return self.__dict__.get("_u8") if "channels" not in self.__dict__ else None

    # --- geometry -----------------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        u8 = self.uint8_channels
        return (u8 if u8 is not None else self.channels).shape[:3]

    @property
    def n_channels(self) -> int:
        u8 = self.uint8_channels
        return (u8 if u8 is not None else self.channels).shape[3]

    @property
    def world_to_voxel(self) -> np.ndarray:
        """(4, 4) world mm -> voxel index."""
        return np.linalg.inv(self.affine)

    @property
    def spacing_mm(self) -> np.ndarray:
        """(3,) voxel edge lengths (mm)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def voxel_to_world(self, ijk) -> np.ndarray:
        return voxel_to_world(self.affine, ijk)

    def world_to_index(self, xyz) -> np.ndarray:
        return voxel_to_world(self.world_to_voxel, xyz)

    @property
    def centre_mm(self) -> np.ndarray:
        return self.voxel_to_world((np.array(self.shape) - 1) / 2.0)

    def contains_world(self, xyz) -> np.ndarray:
        """Boolean: world points (..., 3) inside the voxel grid."""
        idx = self.world_to_index(xyz)
        return np.all((idx >= 0) & (idx <= np.array(self.shape) - 1), axis=-1)

    def channel(self, name: str) -> np.ndarray:
        if name not in self.channel_names:
            raise KeyError(f"volume {self.name!r} has no channel {name!r} (has {self.channel_names})")
        return self.channels[..., self.channel_names.index(name)]

    @property
    def intensity_index(self) -> int | None:
        return self.channel_names.index(INTENSITY) if INTENSITY in self.channel_names else None

    @property
    def tissue_names(self) -> tuple:
        return tuple(n for n in self.channel_names if n != INTENSITY)

    def display_channel(self) -> np.ndarray:
        """(X, Y, Z) channel to show as 'the MRI': intensity if present, else a tissue sum."""
        i = self.intensity_index
        return self.channels[..., i] if i is not None else self.channels.sum(-1)

    @classmethod
    def from_array(cls, data, affine=None, spacing_mm=1.0, name="array", normalise=True,
                   **kw) -> "Volume":
        """A single-intensity-channel volume from a 3-D array (values normalised to [0, 1]
        with robust percentiles unless ``normalise=False``). Without ``affine`` the grid is
        axis-aligned with the given spacing and centred on the world origin."""
        data = _check_array(np.asarray(data), name)
        if affine is None:
            sp = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
            affine = np.diag([*sp, 1.0])
            affine[:3, 3] = -sp * (np.array(data.shape) - 1) / 2.0
        if normalise:
            data = normalise_intensity(data, name)
        return cls(data[..., None], affine, (INTENSITY,), name=name, **kw)


def voxel_to_world(affine, ijk) -> np.ndarray:
    """Points (..., 3) mapped by the 4x4 ``affine`` (voxel -> world, or with the inverse
    affine world -> fractional voxel index)."""
    ijk = np.asarray(ijk, dtype=np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _check_shape(shape, name) -> None:
    if len(shape) != 3:
        raise ValueError(f"volume {name!r}: expected 3-D data, got {len(shape)}-D shape {tuple(shape)}")
    if any(int(s) == 0 for s in shape):
        raise ValueError(f"volume {name!r} is empty (shape {tuple(shape)})")
    if any(int(s) < MIN_DIM for s in shape):
        raise ValueError(f"volume {name!r}: every dimension needs at least {MIN_DIM} voxels, "
                         f"got shape {tuple(shape)}")
    if int(np.prod([int(s) for s in shape])) > MAX_VOXELS:
        raise ValueError(f"volume {name!r}: shape {tuple(shape)} is absurdly large "
                         f"(more than {MAX_VOXELS} voxels)")


def _check_affine(affine, name) -> np.ndarray:
    A = np.asarray(affine, dtype=np.float64)
    if A.shape != (4, 4) or not np.all(np.isfinite(A)):
        raise ValueError(f"volume {name!r}: affine must be a finite 4x4 matrix")
    det = np.linalg.det(A[:3, :3])
    if abs(det) < 1e-9:
        raise ValueError(f"volume {name!r}: affine is singular (zero voxel size?)")
    sp = np.linalg.norm(A[:3, :3], axis=0)
    if np.any(sp > 100.0) or np.any(sp < 1e-3):
        raise ValueError(f"volume {name!r}: voxel spacing {sp} mm is outside [0.001, 100] mm")
    A = A.copy()
    A[3] = [0, 0, 0, 1]
    return A


CHUNK_VOXELS = 1 << 20        # element block of the chunked passes (4 MB float32, 8 MB float64)


def _blocks(n: int, size: int = CHUNK_VOXELS):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def _flat_view(a: np.ndarray) -> np.ndarray | None:
    """1-D view of a C- or F-contiguous array in memory order (None if there is none)."""
    if a.flags.c_contiguous:
        return a.reshape(-1)
    if a.flags.f_contiguous:
        return a.T.reshape(-1)
    return None


def _all_finite(a: np.ndarray) -> bool:
    """np.all(np.isfinite(a)) without a full-size boolean temporary: min and max of each block
    are finite iff the block holds no NaN/Inf (both propagate through min/max)."""
    flat = _flat_view(a)
    if flat is None or flat.dtype.kind != "f":
        return bool(np.all(np.isfinite(a)))
    for b in _blocks(flat.size):
        c = flat[b]
        if not (np.isfinite(c.min()) and np.isfinite(c.max())):
            return False
    return True


def _check_array(data: np.ndarray, name: str, owned: bool = False) -> np.ndarray:
    """Validate a 3-D (or X, Y, Z, 1) real array; float32 (a copy only when the input is not
    float32). NaN/Inf voxels are replaced by the minimum finite value: in place (blockwise, no
    full-size temporaries) when the float32 array is our own (a conversion copy, or ``owned``),
    else in a copy (the caller's array is never modified)."""
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        raise ValueError(f"volume {name!r}: 4-D data with {data.shape[3]} volumes; "
                         "pass a single 3-D volume (select one time point or channel)")
    if data.ndim != 3:
        raise ValueError(f"volume {name!r}: expected 3-D data, got {data.ndim}-D shape {data.shape}")
    _check_shape(data.shape, name)
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise ValueError(f"volume {name!r}: data type {data.dtype} is not a real number type")
    owned = owned or data.dtype != np.float32
    data = data.astype(np.float32, copy=False)
    if _all_finite(data):
        return data
    return _replace_nonfinite(data, name, owned)


def _replace_nonfinite(data: np.ndarray, name: str, inplace: bool) -> np.ndarray:
    """Replace NaN/Inf voxels by the minimum finite value (in ``data`` itself if ``inplace`` and
    it is a writeable contiguous array, else in a copy)."""
    flat = _flat_view(data)
    if flat is None or not inplace or not data.flags.writeable:
        data = np.array(data, order="C")
        flat = data.reshape(-1)
    lo, n_bad = None, 0
    for b in _blocks(flat.size):
        c = flat[b]
        ok = np.isfinite(c)
        n_bad += int(ok.size - np.count_nonzero(ok))
        if ok.any():
            m = c[ok].min()
            lo = m if lo is None or m < lo else lo
    if lo is None:
        raise ValueError(f"volume {name!r} contains only NaN/Inf values")
    log.warning("volume %r: %d NaN/Inf voxels replaced by the minimum", name, n_bad)
    for b in _blocks(flat.size):
        c = flat[b]
        c[~np.isfinite(c)] = lo
    return data


def _c_order_subsample(data: np.ndarray, step: int) -> np.ndarray:
    """data.reshape(-1)[::step] (C order) without copying the whole array."""
    if data.flags.c_contiguous:
        return data.reshape(-1)[::step]
    n = data.size
    out = np.empty((n + step - 1) // step, dtype=data.dtype)
    per = max(1, CHUNK_VOXELS // 4)
    for i in range(0, out.size, per):
        j = min(out.size, i + per)
        out[i:j] = data[np.unravel_index(np.arange(i, j, dtype=np.int64) * step, data.shape)]
    return out


def normalise_intensity(data: np.ndarray, name: str = "volume", lo_pct=0.5, hi_pct=99.5,
                        out: np.ndarray | None = None):
    """Map intensities to [0, 1] with robust percentiles (computed on a subsample: every
    ``size // 2e6``-th voxel in C order). Returns a new float32 array, or writes into ``out``
    (a float32 array of the same shape and memory layout; ``out=data`` normalises in place).
    The values are exactly float32(clip((x - lo) / (hi - lo), 0, 1)) evaluated in float64, done
    block by block so that no full-size float64 temporaries exist."""
    data = np.asarray(data)
    size = data.size
    sub = _c_order_subsample(data, max(1, size // 2_000_000))
    lo, hi = np.percentile(sub, [lo_pct, hi_pct])
    del sub
    if hi <= lo:
        lo, hi = float(data.min()), float(data.max())
    if _flat_view(data) is None:                      # strided view: one contiguous copy
        data = np.ascontiguousarray(data)
    order = "C" if data.flags.c_contiguous else "F"
    src = data.reshape(-1) if order == "C" else data.T.reshape(-1)
    if out is None:
        out = np.empty(data.shape, dtype=np.float32, order=order)
    if (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != data.shape
            or not out.flags[f"{order}_CONTIGUOUS"] or not out.flags.writeable):
        raise ValueError("normalise_intensity: out must be a writeable float32 array of the "
                         "input's shape and memory layout")
    dst = out.reshape(-1) if order == "C" else out.T.reshape(-1)
    if hi <= lo:
        log.warning("volume %r is constant (%g): intensity mapped to 0", name, lo)
        dst[:] = 0.0
        return out
    span = hi - lo
    for b in _blocks(size):
        t = np.subtract(src[b], lo)          # float64 (or float32 with the min/max fallback)
        np.divide(t, span, out=t)
        np.clip(t, 0.0, 1.0, out=t)
        dst[b] = t
    return out


def _read_nifti_float32(img, path: str) -> np.ndarray:
    """The voxel data of ``img`` (loaded from ``path``) as a new C-order float32 (X, Y, Z)
    array, read slab by slab straight from the file (scaling applied per slab by nibabel
    itself), so that no other full-size copy exists: the same values as
    ``np.asarray(img.dataobj, dtype=np.float32)``. A gzip file is decompressed once, to its end,
    which also checks its CRC and length (nibabel never reads the gzip trailer)."""
    import gzip

    from nibabel.arrayproxy import ArrayProxy
    from nibabel.openers import ImageOpener

    proxy = img.dataobj
    shape = tuple(int(s) for s in proxy.shape)
    fname = getattr(proxy, "file_like", None)
    crc_checked = False
    if (type(proxy) is ArrayProxy and isinstance(fname, str) and len(shape) in (3, 4)
            and proxy.order == "F"):
        X, Y, Z = shape[:3]
        tail = (0,) if len(shape) == 4 else ()
        data = np.empty((X, Y, Z), dtype=np.float32)
        with ImageOpener(fname, "rb") as fh:
            prox = ArrayProxy(fh, (proxy.shape, proxy.dtype, proxy.offset, proxy.slope,
                                   proxy.inter), mmap=False, order="F")
            per = max(1, CHUNK_VOXELS // (X * Y))      # slabs of z planes: contiguous in the file
            for k in range(0, Z, per):
                sl = np.s_[:, :, k:min(Z, k + per)]
                data[sl] = prox[sl + tail]
            if isinstance(fh.fobj, gzip.GzipFile):
                while fh.read(1 << 24):                 # gzip checks the CRC at the end
                    pass
                crc_checked = fname == path
    else:                                               # other layouts: nibabel's full read
        data = np.asarray(proxy, dtype=np.float32)
        if data.ndim == 4:
            data = data[..., 0]
        data = np.ascontiguousarray(data)
    if path.endswith(".gz") and not crc_checked:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass
    return data


def load_nifti(path: str, name: str | None = None) -> Volume:
    """Load a 3-D NIfTI (.nii / .nii.gz) as an intensity volume, keeping its affine.

    Memory: the voxel data is read slab by slab into one float32 array that is then validated,
    normalised and used as the volume's channel in place (peak about the float32 volume plus a
    few MB)."""
    import nibabel as nib

    name = name or os.path.basename(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"volume file not found: {path!r} (and it is not a built-in "
                                f"volume: {', '.join(sorted(BUILTINS))})")
    if os.path.isdir(path):
        raise ValueError(f"volume path {path!r} is a directory, not a NIfTI file")
    try:
        img = nib.load(path)
    except Exception as e:
        raise ValueError(f"cannot read {path!r} as NIfTI: {type(e).__name__}: {e}") from None
    if not hasattr(img, "affine") or img.affine is None:
        raise ValueError(f"{path!r} has no affine (not a NIfTI/Analyze volume?)")
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] != 1:
        raise ValueError(f"volume {name!r}: 4-D NIfTI with {shape[3]} volumes; "
                         "pass a single 3-D volume (select one time point or channel)")
    if len(shape) not in (3, 4):
        raise ValueError(f"volume {name!r}: expected 3-D data, got {len(shape)}-D shape {shape}")
    _check_shape(shape[:3], name)
    try:
        data = _read_nifti_float32(img, path)
    except Exception as e:
        raise ValueError(f"cannot read the voxel data of {path!r} (corrupt or truncated file?): "
                         f"{type(e).__name__}: {e}") from None
    data = _check_array(data, name, owned=True)
    normalise_intensity(data, name, out=data)
    vol = Volume(data[..., None], img.affine, (INTENSITY,), name=name)
    vol.meta["path"] = os.path.abspath(path)
    return vol


# --------------------------------------------------------------------------------------------
# built-in volumes
# --------------------------------------------------------------------------------------------
BUILTINS: dict[str, Callable[[], Volume]] = {}
DEFAULT_VOLUME = "brain"


def register_builtin(name: str):
    """Decorator: register ``fn() -> Volume`` as the built-in volume ``name``."""
    def deco(fn):
        BUILTINS[name] = fn
        return fn
    return deco


def load_volume(spec: "str | Volume | None" = None) -> Volume:
    """A built-in by name (``brain``, ``phantom``, ...), a NIfTI path, or a Volume (returned)."""
    from . import builtin_volumes  # noqa: F401  (registers the built-ins)

    if spec is None:
        spec = DEFAULT_VOLUME
    if isinstance(spec, Volume):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"volume must be a name, a path or a Volume, got {type(spec).__name__}")
    spec = os.fspath(spec)
    if spec in BUILTINS:
        vol = BUILTINS[spec]()
        vol.name = spec
        return vol
    return load_nifti(spec)


def default_pose_for(vol: Volume) -> Pose:
    """A probe on the top (+z world) surface of the non-background content, looking down (-z),
    lateral along +x: a generic craniotomy-like pose.

    Content: the intensity channel (or the sum of the channels); the voxels above 20 % of its
    maximum, every n-th in C order (at most ~200000 of them), give the centre and the top.
    Computed slab by slab (1-bit masks kept in between): no full-size temporaries."""
    ch = vol.channels
    ii = vol.intensity_index
    X = ch.shape[0]
    plane = int(np.prod(ch.shape[1:3]))
    per = max(1, CHUNK_VOXELS // plane)
    slabs = [(a, min(X, a + per)) for a in range(0, X, per)]

    def content(a, b):
        return ch[a:b, ..., ii] if ii is not None else ch[a:b].sum(-1)

    if ii is not None:
        cmax = ch[..., ii].max()
    else:
        cmax = max(content(a, b).max() for a, b in slabs)
    thr = 0.2 * float(cmax or 1.0)
    packed, counts = [], []
    for a, b in slabs:
        m = content(a, b) > thr
        counts.append(int(np.count_nonzero(m)))
        packed.append(np.packbits(m.reshape(-1)))
    total = sum(counts)
    if total == 0:
        return Pose.look_at(vol.centre_mm, (0, 0, -1), (1, 0, 0))
    step = max(1, total // 200000)
    parts, rank = [], 0                 # rank: number of content voxels before this slab
    for (a, b), pk, n in zip(slabs, packed, counts):
        if n:
            nz = np.flatnonzero(np.unpackbits(pk, count=(b - a) * plane))
            sel = nz[(-rank) % step::step]
            i, j, k = np.unravel_index(sel, (b - a,) + ch.shape[1:3])
            parts.append(np.stack([i + a, j, k], axis=1))
        rank += n
    idx = np.concatenate(parts)         # == np.argwhere(content > thr)[::step]
    world = vol.voxel_to_world(idx)
    c = world.mean(0)
    near = world[np.linalg.norm(world[:, :2] - c[:2], axis=1) < 5.0]
    top = (near if len(near) else world)[:, 2].max()
    return Pose.look_at((c[0], c[1], top + 1.0), (0, 0, -1), (1, 0, 0))
