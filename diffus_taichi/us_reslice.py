"""Ultrasound-volume reslicer: the "real" image at a probe pose, sampled from a 3-D ultrasound
volume (e.g. a ReMIND intra-operative volume) along the probe's fan with the simulator's
geometry and scan conversion.

Every scan line ``r`` is sampled at the simulator's ray points ``pose(o_r + s * ds * d_r)``
(:meth:`Probe.line_geometry`, ``ds`` = :attr:`Probe.sample_spacing_mm`), trilinearly in the
volume's voxel grid (world mm -> voxel through its affine); the (lines, samples) image is then
scan-converted to the fan with the same bilinear lookup as :mod:`diffus_taichi.scan` (zero
outside the sector). Voxels equal to 0 are "not acquired": :meth:`USReslicer.coverage` gives,
per fan pixel, whether the volume has data there (use it as the loss mask).

    rs = USReslicer(us_volume, probe)
    real = rs.reslice(pose)          # (H, W) in [0, 1]
    mask = rs.coverage(pose) > 0.99  # (H, W) bool
"""
from __future__ import annotations

import numpy as np

from .pose import Pose
from .probe import Probe, get_probe
from .simulator import sample_trilinear_np
from .volume import Volume, load_volume


def scan_convert_np(lines: np.ndarray, base: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """NumPy twin of :func:`diffus_taichi.scan.scan_convert`: (n_lines, n_samples) -> (H, W)."""
    l, s = base[..., 0], base[..., 1]
    ok = l >= 0
    l, s = np.where(ok, l, 0), np.where(ok, s, 0)
    fl, fs = frac[..., 0], frac[..., 1]
    v0 = lines[l, s] + fs * (lines[l, s + 1] - lines[l, s])
    v1 = lines[l + 1, s] + fs * (lines[l + 1, s + 1] - lines[l + 1, s])
    return np.where(ok, v0 + fl * (v1 - v0), 0.0)


class USReslicer:
    """Reslices one ultrasound volume for one probe geometry (lookups computed once).

    us: Volume (its display channel is the intensity) or anything :func:`load_volume` takes;
    probe: preset name or :class:`Probe`."""

    def __init__(self, us, probe="craniotomy"):
        from .scan import scan_lookup

        self.volume: Volume = load_volume(us)
        self.probe: Probe = probe if isinstance(probe, Probe) else get_probe(probe)
        self.data = np.asarray(self.volume.display_channel(), np.float32)
        self.acquired = (self.data > 0).astype(np.float32)
        o, d = self.probe.line_geometry()
        depth = self.probe.sample_depths_mm()
        self._pts = o[:, None, :] + depth[None, :, None] * d[:, None, :]   # (NR, NS, 3) probe mm
        self._base, self._frac = scan_lookup(self.probe)

    def _index(self, pose: Pose) -> np.ndarray:
        if not isinstance(pose, Pose):
            pose = Pose.from_vector(pose)
        return self.volume.world_to_index(pose.probe_to_world(self._pts))

    def lines(self, pose: Pose) -> np.ndarray:
        """(n_lines, n_samples) volume intensity along the scan lines (0 outside the volume)."""
        return sample_trilinear_np(self.data, self._index(pose))

    def reslice(self, pose: Pose) -> np.ndarray:
        """(H, W) float64 fan image of the volume at ``pose`` (row 0 = shallowest)."""
        return scan_convert_np(self.lines(pose), self._base, self._frac)

    def coverage(self, pose: Pose) -> np.ndarray:
        """(H, W) in [0, 1]: trilinear fraction of acquired (non-zero) voxels at each fan pixel;
        0 outside the sector."""
        idx = self._index(pose)
        return scan_convert_np(sample_trilinear_np(self.acquired, idx), self._base, self._frac)

    def mask(self, pose: Pose, min_coverage: float = 0.99) -> np.ndarray:
        """(H, W) bool: inside the sector and fully covered by acquired voxels."""
        return (self.coverage(pose) >= min_coverage) & self.probe.scan_grid()[2]
