"""MRI reslice in the probe's image plane, on the Cartesian fan pixel grid (Taichi).

The reslice is the volume's display channel (:meth:`Volume.display_channel`) sampled
trilinearly at the centre of every fan pixel, i.e. at probe-frame points
``(x_j, 0, z_i)`` mapped to world by the pose and to voxel indices by the volume affine.
Row 0 is the shallowest row, column 0 the most negative lateral x, exactly like the fan
image of :class:`~diffus_taichi.simulator.Simulator` (zero outside the volume).

    rs = Reslicer(volume, probe)
    rs.update(pose)                 # one kernel launch; rs.image is an (H, W) f32 field
    img = rs.to_numpy()

The probe grid is uniform (:meth:`Probe.fan_axes_mm`), so the kernel only needs the first
pixel centre and the pixel size; the pose enters as one 4x4 probe-to-voxel matrix argument
(no per-frame field upload). Matches :func:`diffus_taichi.simulator.sample_trilinear_np`.
"""
import numpy as np
import taichi as ti

from .pose import Pose
from .probe import Probe
from .volume import Volume


@ti.func
def sample_trilinear(vol: ti.template(), p):
    """Trilinear value of a scalar field at fractional voxel index p (zero outside the grid).
    Out-of-grid corners get zero weight; indices are clamped so every fetch is in bounds."""
    f0 = ti.floor(p)
    i, j, k = ti.cast(f0[0], ti.i32), ti.cast(f0[1], ti.i32), ti.cast(f0[2], ti.i32)
    fx, fy, fz = p[0] - f0[0], p[1] - f0[1], p[2] - f0[2]
    X, Y, Z = vol.shape[0], vol.shape[1], vol.shape[2]
    wx0 = (1.0 - fx) * ti.cast(0 <= i < X, ti.f32)
    wx1 = fx * ti.cast(-1 <= i < X - 1, ti.f32)
    wy0 = (1.0 - fy) * ti.cast(0 <= j < Y, ti.f32)
    wy1 = fy * ti.cast(-1 <= j < Y - 1, ti.f32)
    wz0 = (1.0 - fz) * ti.cast(0 <= k < Z, ti.f32)
    wz1 = fz * ti.cast(-1 <= k < Z - 1, ti.f32)
    v = 0.0
    if wx0 + wx1 > 0.0 and wy0 + wy1 > 0.0 and wz0 + wz1 > 0.0:
        i0, i1 = ti.min(ti.max(i, 0), X - 1), ti.min(ti.max(i + 1, 0), X - 1)
        j0, j1 = ti.min(ti.max(j, 0), Y - 1), ti.min(ti.max(j + 1, 0), Y - 1)
        k0, k1 = ti.min(ti.max(k, 0), Z - 1), ti.min(ti.max(k + 1, 0), Z - 1)
        v = (wz0 * (wy0 * (wx0 * vol[i0, j0, k0] + wx1 * vol[i1, j0, k0])
                    + wy1 * (wx0 * vol[i0, j1, k0] + wx1 * vol[i1, j1, k0]))
             + wz1 * (wy0 * (wx0 * vol[i0, j0, k1] + wx1 * vol[i1, j0, k1])
                      + wy1 * (wx0 * vol[i0, j1, k1] + wx1 * vol[i1, j1, k1])))
    return v


@ti.func
def sample_trilinear_fast(vol: ti.template(), p):
    """:func:`sample_trilinear` with a branch for the common case of all eight corners inside
    the grid (no clamping or weight masks: ~2.5x faster on CPU)."""
    f0 = ti.floor(p)
    i, j, k = ti.cast(f0[0], ti.i32), ti.cast(f0[1], ti.i32), ti.cast(f0[2], ti.i32)
    v = 0.0
    if 0 <= i < vol.shape[0] - 1 and 0 <= j < vol.shape[1] - 1 and 0 <= k < vol.shape[2] - 1:
        fx, fy, fz = p[0] - f0[0], p[1] - f0[1], p[2] - f0[2]
        c00 = vol[i, j, k] + fx * (vol[i + 1, j, k] - vol[i, j, k])
        c10 = vol[i, j + 1, k] + fx * (vol[i + 1, j + 1, k] - vol[i, j + 1, k])
        c01 = vol[i, j, k + 1] + fx * (vol[i + 1, j, k + 1] - vol[i, j, k + 1])
        c11 = vol[i, j + 1, k + 1] + fx * (vol[i + 1, j + 1, k + 1] - vol[i, j + 1, k + 1])
        c0 = c00 + fy * (c10 - c00)
        c1 = c01 + fy * (c11 - c01)
        v = c0 + fz * (c1 - c0)
    else:
        v = sample_trilinear(vol, p)
    return v


@ti.kernel
def reslice_kernel(vol: ti.template(), p2v: ti.types.matrix(4, 4, ti.f32), x0: ti.f32,
                   z0: ti.f32, px: ti.f32, out: ti.template()):
    """out[i, j] = vol at probe point (x0 + j px, 0, z0 + i px); p2v maps probe mm -> voxel."""
    ex = ti.Vector([p2v[0, 0], p2v[1, 0], p2v[2, 0]])       # voxel step per probe mm along x
    ez = ti.Vector([p2v[0, 2], p2v[1, 2], p2v[2, 2]])       # ... along z (depth)
    o = ti.Vector([p2v[0, 3], p2v[1, 3], p2v[2, 3]]) + x0 * ex + z0 * ez
    for i, j in out:
        out[i, j] = sample_trilinear_fast(vol, o + (j * px) * ex + (i * px) * ez)


class Reslicer:
    """Holds the display-channel volume and the reslice image fields for one volume/probe.

    Args:
        volume: the :class:`Volume` (its display channel is uploaded once, as f32).
        probe: the :class:`Probe` whose fan pixel grid is used (change with :meth:`set_probe`).
    Taichi must already be initialised (e.g. by ``backend.ensure`` or a Simulator).
    """

    def __init__(self, volume: Volume, probe: Probe):
        self.volume = volume
        data = np.ascontiguousarray(volume.display_channel(), dtype=np.float32)
        self.vol = ti.field(ti.f32, shape=data.shape)
        self.vol.from_numpy(data)
        self.w2v = volume.world_to_voxel
        self.image = None
        self.probe = None
        self.set_probe(probe)

    def set_probe(self, probe: Probe) -> None:
        """Use the fan grid of ``probe``; reallocates the image only if its size changes."""
        x, z = probe.fan_axes_mm()
        self.x0, self.z0 = float(x[0]), float(z[0])
        self.px = float(probe.fan_pixel_mm())
        if self.image is None or tuple(self.image.shape) != tuple(probe.image_px):
            self.image = ti.field(ti.f32, shape=tuple(probe.image_px))
        self.probe = probe

    def probe_to_voxel(self, pose: "Pose | np.ndarray") -> np.ndarray:
        """(4, 4) probe mm -> voxel index for a Pose or a 4x4 probe-to-world matrix."""
        M = pose.matrix if isinstance(pose, Pose) else np.asarray(pose, dtype=np.float64)
        return self.w2v @ M

    def update(self, pose: "Pose | np.ndarray") -> None:
        """Reslice at ``pose`` (a Pose or a 4x4 probe-to-world matrix) into :attr:`image`."""
        A = self.probe_to_voxel(pose).astype(np.float32)
        reslice_kernel(self.vol, ti.Matrix(A.tolist()), self.x0, self.z0, self.px, self.image)

    def to_numpy(self) -> np.ndarray:
        return self.image.to_numpy()


def fan_inside_mask(probe: Probe, shape: "tuple | None" = None) -> np.ndarray:
    """(h, w) bool: pixel centres inside the imaged sector. ``shape`` (h, w) resamples the
    fan grid to another display size (same field of view in mm)."""
    if shape is None or tuple(shape) == tuple(probe.image_px):
        return probe.scan_grid()[2]
    h, w = int(shape[0]), int(shape[1])
    x, z = probe.fan_axes_mm()
    H, W = probe.image_px
    # display pixel centres in units of fan pixels, then mm
    u = (np.arange(w) + 0.5) * W / w - 0.5
    v = (np.arange(h) + 0.5) * H / h - 0.5
    px = probe.fan_pixel_mm()
    X, Z = np.meshgrid(x[0] + u * px, z[0] + v * px)
    li, si = probe.probe_to_line_coords(X, Z)
    return (li >= 0) & (li <= probe.n_lines - 1) & (si >= 0) & (si <= probe.n_samples - 1)


def outline_from_mask(inside: np.ndarray, thickness: int = 1) -> np.ndarray:
    """(h, w) bool: pixels of ``inside`` within ``thickness`` pixels of its border."""
    inner = inside.copy()
    for _ in range(max(1, int(thickness))):
        e = inner.copy()
        e[1:, :] &= inner[:-1, :]
        e[:-1, :] &= inner[1:, :]
        e[:, 1:] &= inner[:, :-1]
        e[:, :-1] &= inner[:, 1:]
        e[0, :] = e[-1, :] = False
        e[:, 0] = e[:, -1] = False
        inner = e
    return inside & ~inner
