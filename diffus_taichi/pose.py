"""Probe pose: 6 degrees of freedom, probe frame -> world (mm).

A pose maps probe-frame coordinates to world coordinates::

    x_world = R @ x_probe + t

with ``t`` the translation in world mm (the centre of the probe face) and ``R`` the rotation
whose columns are the probe axes in world coordinates: lateral (x), elevation (y), axial (z, into
tissue). ``R`` is parameterised by a rotation vector ``w`` (axis * angle, radians), ``R = exp([w]x)``.
The parameter vector used by kernels is ``[tx, ty, tz, wx, wy, wz]`` (mm, mm, mm, rad, rad, rad).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np


def _skew(v: np.ndarray) -> np.ndarray:
    return np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])


def rotvec_to_matrix(w) -> np.ndarray:
    """Rotation vector (3,) in radians -> rotation matrix (3, 3) (Rodrigues)."""
    w = np.asarray(w, dtype=np.float64)
    th = float(np.linalg.norm(w))
    if th < 1e-12:
        return np.eye(3) + _skew(w)
    k = _skew(w / th)
    return np.eye(3) + math.sin(th) * k + (1.0 - math.cos(th)) * (k @ k)


def matrix_to_rotvec(R) -> np.ndarray:
    """Rotation matrix (3, 3) -> rotation vector (3,) in radians, angle in [0, pi]; well
    conditioned at every angle (atan2; axis from the symmetric part near pi)."""
    R = np.asarray(R, dtype=np.float64)
    v = 0.5 * np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])  # sin(th) axis
    s = float(np.linalg.norm(v))
    c = (float(np.trace(R)) - 1.0) / 2.0
    th = math.atan2(s, c)
    if th < 1e-6:
        return v * (1.0 + th * th / 6.0)
    if c > -0.9:
        return v * (th / s)
    B = ((R + R.T) / 2.0 - c * np.eye(3)) / (1.0 - c)   # = k k^T
    i = int(np.argmax(np.diag(B)))
    k = B[:, i] / math.sqrt(B[i, i])
    k /= np.linalg.norm(k)
    if k @ v < 0:
        k = -k
    return k * th


def quaternion_to_matrix(q) -> np.ndarray:
    """Unit quaternion (w, x, y, z), scalar first -> rotation matrix (3, 3)."""
    q = np.asarray(q, dtype=np.float64)
    n = np.linalg.norm(q)
    if q.shape != (4,) or not np.isfinite(n) or n < 1e-12:
        raise ValueError(f"quaternion must be 4 finite values, not all zero; got {q}")
    w, x, y, z = q / n
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def matrix_to_quaternion(R) -> np.ndarray:
    """Rotation matrix -> unit quaternion (w, x, y, z) with w >= 0."""
    w = matrix_to_rotvec(R)
    th = float(np.linalg.norm(w))
    if th < 1e-12:
        return np.array([1.0, 0.0, 0.0, 0.0])
    q = np.concatenate([[math.cos(th / 2)], math.sin(th / 2) * w / th])
    return q if q[0] >= 0 else -q


def euler_to_matrix(angles_rad) -> np.ndarray:
    """Euler angles (a, b, c) in radians, convention 'xyz' extrinsic: rotate about world x by a,
    then world y by b, then world z by c, i.e. R = Rz(c) @ Ry(b) @ Rx(a)."""
    a, b, c = np.asarray(angles_rad, dtype=np.float64)
    ca, sa, cb, sb, cc, sc = math.cos(a), math.sin(a), math.cos(b), math.sin(b), math.cos(c), math.sin(c)
    Rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    Ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    Rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    return Rz @ Ry @ Rx


def matrix_to_euler(R) -> np.ndarray:
    """Inverse of :func:`euler_to_matrix` (b in [-pi/2, pi/2])."""
    R = np.asarray(R, dtype=np.float64)
    b = math.asin(float(np.clip(-R[2, 0], -1.0, 1.0)))
    if abs(R[2, 0]) < 1 - 1e-10:
        a = math.atan2(R[2, 1], R[2, 2])
        c = math.atan2(R[1, 0], R[0, 0])
    else:   # gimbal lock: only a - c (or a + c) is defined; put it all in a
        c = 0.0
        a = math.atan2(-R[1, 2], R[1, 1])
    return np.array([a, b, c])


def _V(w) -> np.ndarray:
    th = float(np.linalg.norm(w))
    K = _skew(w)
    if th < 1e-8:
        return np.eye(3) + 0.5 * K + K @ K / 6.0
    return np.eye(3) + (1 - math.cos(th)) / th ** 2 * K + (th - math.sin(th)) / th ** 3 * (K @ K)


def se3_exp(xi) -> np.ndarray:
    """se(3) vector (rho (3,) mm, omega (3,) rad) -> 4x4 matrix (R = exp(omega), t = V rho)."""
    xi = np.asarray(xi, dtype=np.float64)
    M = np.eye(4)
    M[:3, :3] = rotvec_to_matrix(xi[3:])
    M[:3, 3] = _V(xi[3:]) @ xi[:3]
    return M


def se3_log(M) -> np.ndarray:
    """4x4 matrix -> se(3) vector (rho mm, omega rad), inverse of :func:`se3_exp`."""
    M = np.asarray(M, dtype=np.float64)
    w = matrix_to_rotvec(M[:3, :3])
    return np.concatenate([np.linalg.solve(_V(w), M[:3, 3]), w])


def _check_rotation(R: np.ndarray) -> None:
    if not np.all(np.isfinite(R)):
        raise ValueError("pose matrix contains NaN or Inf")
    if np.abs(R.T @ R - np.eye(3)).max() > 1e-4 or np.linalg.det(R) < 0:
        raise ValueError("pose matrix: the upper-left 3x3 block is not a rotation "
                         "(must be orthonormal with determinant +1)")


@dataclass(frozen=True)
class Pose:
    """Probe-to-world pose. ``translation_mm`` (3,), ``rotvec_rad`` (3,)."""

    translation_mm: tuple
    rotvec_rad: tuple

    def __post_init__(self):
        t = np.asarray(self.translation_mm, dtype=np.float64).reshape(-1)
        w = np.asarray(self.rotvec_rad, dtype=np.float64).reshape(-1)
        if t.shape != (3,) or w.shape != (3,):
            raise ValueError("pose needs 3 translation (mm) and 3 rotation-vector values")
        if not (np.all(np.isfinite(t)) and np.all(np.isfinite(w))):
            raise ValueError("pose contains NaN or Inf")
        object.__setattr__(self, "translation_mm", tuple(float(x) for x in t))
        object.__setattr__(self, "rotvec_rad", tuple(float(x) for x in w))

    # --- constructors -------------------------------------------------------------------------
    @classmethod
    def from_vector(cls, v) -> "Pose":
        """From ``[tx, ty, tz, wx, wy, wz]`` (mm, radians)."""
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        if v.shape != (6,):
            raise ValueError(f"pose vector must have 6 values, got {v.size}")
        return cls(v[:3], v[3:])

    @classmethod
    def from_matrix(cls, M) -> "Pose":
        """From a 4x4 homogeneous probe-to-world matrix (mm)."""
        M = np.asarray(M, dtype=np.float64)
        if M.shape != (4, 4):
            raise ValueError(f"pose matrix must be 4x4, got shape {M.shape}")
        if np.abs(M[3] - [0, 0, 0, 1]).max() > 1e-6:
            raise ValueError("pose matrix: last row must be [0, 0, 0, 1]")
        _check_rotation(M[:3, :3])
        return cls(M[:3, 3], matrix_to_rotvec(M[:3, :3]))

    @classmethod
    def from_degrees(cls, tx, ty, tz, rx, ry, rz) -> "Pose":
        """From translation (mm) and rotation vector given in degrees."""
        return cls((tx, ty, tz), np.radians([rx, ry, rz]))

    @classmethod
    def look_at(cls, origin_mm, axial_dir, lateral_hint) -> "Pose":
        """Probe face at ``origin_mm`` looking along ``axial_dir``; lateral axis as close as
        possible to ``lateral_hint`` (both world directions)."""
        z = np.asarray(axial_dir, dtype=np.float64)
        z = z / np.linalg.norm(z)
        x = np.asarray(lateral_hint, dtype=np.float64)
        x = x - z * (x @ z)
        if np.linalg.norm(x) < 1e-9:
            raise ValueError("lateral_hint is parallel to axial_dir")
        x = x / np.linalg.norm(x)
        y = np.cross(z, x)
        M = np.eye(4)
        M[:3, 0], M[:3, 1], M[:3, 2], M[:3, 3] = x, y, z, origin_mm
        return cls.from_matrix(M)

    @classmethod
    def parse(cls, text: str) -> "Pose":
        """CLI form: ``tx,ty,tz,rx,ry,rz`` (mm; rotation vector in degrees) or a file holding a
        4x4 probe-to-world matrix (text readable by ``numpy.loadtxt`` or ``.npy``)."""
        text = os.fspath(text)
        if os.path.exists(text):
            try:
                M = np.load(text) if text.endswith(".npy") else np.loadtxt(text)
            except Exception as e:
                raise ValueError(f"pose file {text!r}: cannot read a 4x4 matrix ({e})") from e
            return cls.from_matrix(M)
        parts = [p for p in text.replace(" ", ",").split(",") if p]
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"pose {text!r}: expected 'tx,ty,tz,rx,ry,rz' (mm, degrees) "
                             "or the path of a file with a 4x4 matrix") from None
        if len(vals) != 6:
            raise ValueError(f"pose {text!r}: expected 6 numbers tx,ty,tz,rx,ry,rz, got {len(vals)}")
        return cls.from_degrees(*vals)

    # --- views --------------------------------------------------------------------------------
    @property
    def rotation(self) -> np.ndarray:
        """(3, 3) rotation, columns = lateral, elevation, axial axes in world."""
        return rotvec_to_matrix(self.rotvec_rad)

    @property
    def matrix(self) -> np.ndarray:
        """(4, 4) homogeneous probe-to-world matrix (mm)."""
        M = np.eye(4)
        M[:3, :3] = self.rotation
        M[:3, 3] = self.translation_mm
        return M

    def as_vector(self) -> np.ndarray:
        """``[tx, ty, tz, wx, wy, wz]`` (mm, radians), float64 (6,)."""
        return np.array(self.translation_mm + self.rotvec_rad)

    @classmethod
    def from_quaternion(cls, translation_mm, q) -> "Pose":
        """Translation (mm) + unit quaternion (w, x, y, z)."""
        return cls(translation_mm, matrix_to_rotvec(quaternion_to_matrix(q)))

    @classmethod
    def from_euler(cls, translation_mm, angles_rad) -> "Pose":
        """Translation (mm) + Euler angles 'xyz' extrinsic (radians), R = Rz Ry Rx."""
        return cls(translation_mm, matrix_to_rotvec(euler_to_matrix(angles_rad)))

    @classmethod
    def from_se3(cls, xi) -> "Pose":
        """se(3) log vector (rho mm, omega rad)."""
        return cls.from_matrix(se3_exp(xi))

    def as_quaternion(self) -> np.ndarray:
        return matrix_to_quaternion(self.rotation)

    def as_euler(self) -> np.ndarray:
        return matrix_to_euler(self.rotation)

    def as_se3(self) -> np.ndarray:
        return se3_log(self.matrix)

    def error_to(self, other: "Pose") -> tuple[float, float]:
        """(translation error mm, rotation error degrees) between two poses."""
        dt = float(np.linalg.norm(np.subtract(self.translation_mm, other.translation_mm)))
        dR = self.rotation.T @ other.rotation
        return dt, float(np.degrees(np.linalg.norm(matrix_to_rotvec(dR))))

    def to_string(self) -> str:
        """Inverse of :meth:`parse` (mm, degrees)."""
        r = np.degrees(self.rotvec_rad)
        return ",".join(f"{v:.4f}" for v in (*self.translation_mm, *r))

    def probe_to_world(self, pts) -> np.ndarray:
        """Map probe-frame points (..., 3) in mm to world mm."""
        return np.asarray(pts) @ self.rotation.T + np.asarray(self.translation_mm)

    def moved(self, d_probe_mm=(0, 0, 0), d_rotvec_probe_rad=(0, 0, 0)) -> "Pose":
        """Pose moved by a translation and rotation expressed in the probe's own frame."""
        R = self.rotation
        t = np.asarray(self.translation_mm) + R @ np.asarray(d_probe_mm, dtype=np.float64)
        R2 = R @ rotvec_to_matrix(d_rotvec_probe_rad)
        return Pose(t, matrix_to_rotvec(R2))
