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


@dataclass
class Volume:
    """C-channel voxel volume. channels: (X, Y, Z, C) float32; affine: (4, 4) voxel -> world mm."""

    channels: np.ndarray
    affine: np.ndarray
    channel_names: tuple
    name: str = "volume"
    default_pose: Pose | None = None
    labels: np.ndarray | None = None          # optional integer label map (X, Y, Z)
    label_names: tuple = ()
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
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
        if not np.all(np.isfinite(self.channels)):
            raise ValueError(f"volume {self.name!r}: channels contain NaN or Inf")
        self.affine = _check_affine(self.affine, self.name)
        if self.default_pose is None:
            self.default_pose = default_pose_for(self)

    # --- geometry -----------------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return self.channels.shape[:3]

    @property
    def n_channels(self) -> int:
        return self.channels.shape[3]

    @property
    def world_to_voxel(self) -> np.ndarray:
        """(4, 4) world mm -> voxel index."""
        return np.linalg.inv(self.affine)

    @property
    def spacing_mm(self) -> np.ndarray:
        """(3,) voxel edge lengths (mm)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def voxel_to_world(self, ijk) -> np.ndarray:
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_index(self, xyz) -> np.ndarray:
        xyz = np.asarray(xyz, dtype=np.float64)
        A = self.world_to_voxel
        return xyz @ A[:3, :3].T + A[:3, 3]

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


def _check_array(data: np.ndarray, name: str) -> np.ndarray:
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
    data = data.astype(np.float32, copy=False)
    bad = ~np.isfinite(data)
    if bad.all():
        raise ValueError(f"volume {name!r} contains only NaN/Inf values")
    if bad.any():
        log.warning("volume %r: %d NaN/Inf voxels replaced by the minimum", name, int(bad.sum()))
        data = np.where(bad, np.nanmin(np.where(bad, np.nan, data)), data)
    return data


def normalise_intensity(data: np.ndarray, name: str = "volume", lo_pct=0.5, hi_pct=99.5):
    """Map intensities to [0, 1] with robust percentiles (computed on a subsample)."""
    flat = data.reshape(-1)
    sub = flat[:: max(1, flat.size // 2_000_000)]
    lo, hi = np.percentile(sub, [lo_pct, hi_pct])
    if hi <= lo:
        lo, hi = float(flat.min()), float(flat.max())
    if hi <= lo:
        log.warning("volume %r is constant (%g): intensity mapped to 0", name, lo)
        return np.zeros_like(data, dtype=np.float32)
    return np.clip((data - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def load_nifti(path: str, name: str | None = None) -> Volume:
    """Load a 3-D NIfTI (.nii / .nii.gz) as an intensity volume, keeping its affine."""
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
    if path.endswith(".gz"):   # nibabel never reads the gzip trailer: check the CRC ourselves
        import gzip
        import zlib
        try:
            with gzip.open(path, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"cannot read the voxel data of {path!r} (corrupt or truncated "
                             f"file?): {type(e).__name__}: {e}") from None
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:
        raise ValueError(f"cannot read the voxel data of {path!r} (corrupt or truncated file?): "
                         f"{type(e).__name__}: {e}") from None
    data = _check_array(data, name)
    vol = Volume.from_array(data, affine=img.affine, name=name)
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
    lateral along +x: a generic craniotomy-like pose."""
    content = vol.display_channel() if vol.intensity_index is not None else vol.channels.sum(-1)
    mask = content > 0.2 * float(content.max() or 1.0)
    if not mask.any():
        return Pose.look_at(vol.centre_mm, (0, 0, -1), (1, 0, 0))
    idx = np.argwhere(mask)
    world = vol.voxel_to_world(idx[:: max(1, len(idx) // 200000)])
    c = world.mean(0)
    near = world[np.linalg.norm(world[:, :2] - c[:2], axis=1) < 5.0]
    top = (near if len(near) else world)[:, 2].max()
    return Pose.look_at((c[0], c[1], top + 1.0), (0, 0, -1), (1, 0, 0))
