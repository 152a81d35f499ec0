"""Probe rays from the pose. For each scan line r: world origin ``ro[r]`` (mm) and unit
direction ``rd[r]``, and the same ray in voxel index coordinates (``vo[r]`` and ``vd[r]`` = voxel
displacement per mm along the ray).

``make_rays`` is the only kernel under the Tape that reads the pose (notes 2.6: a per-ray
kernel, so the backward's atomic adds into ``pose.grad`` come from n_rays threads, not from
every sample); the forward-only fused kernel (``fused.march_echo_iq``) makes its rays itself
with the same functions (:func:`pose_transform`, :func:`voxel_affine`, :func:`mat3_vec`).
"""

import taichi as ti


@ti.func
def mat3_vec(M, v):
    """M @ v for a 3x3 matrix and a 3-vector, written out (the same sums, in the same order, as
    Taichi's ``@``, whose generic ti.func costs ~4 ms of kernel preparation per use)."""
    return ti.Vector([M[0, 0] * v[0] + M[0, 1] * v[1] + M[0, 2] * v[2],
                      M[1, 0] * v[0] + M[1, 1] * v[1] + M[1, 2] * v[2],
                      M[2, 0] * v[0] + M[2, 1] * v[1] + M[2, 2] * v[2]])


@ti.func
def dot3(a, b):
    """a . b of two 3-vectors written out (the sum order of Taichi's ``dot``, whose nested
    generic functions cost ~3 ms of kernel preparation per use)."""
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


@ti.func
def rodrigues(w):
    """Rotation vector (radians) -> 3x3 rotation matrix; smooth at w = 0."""
    th = ti.sqrt(dot3(w, w) + 1e-20)
    k = w / th
    K = ti.Matrix([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    KK = ti.Matrix([[K[i, 0] * K[0, j] + K[i, 1] * K[1, j] + K[i, 2] * K[2, j]
                     for j in ti.static(range(3))] for i in ti.static(range(3))])   # K @ K
    I3 = ti.Matrix([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return I3 + ti.sin(th) * K + (1.0 - ti.cos(th)) * KK


@ti.func
def pose_transform(pose: ti.template(), b):
    """Rotation matrix and translation (mm) of pose row b [t mm, rotvec rad]."""
    return (rodrigues(ti.Vector([pose[b, 3], pose[b, 4], pose[b, 5]])),
            ti.Vector([pose[b, 0], pose[b, 1], pose[b, 2]]))


@ti.func
def voxel_affine(A):
    """3x3 linear part and offset of the 4x4 world->voxel matrix A."""
    return (ti.Matrix([[A[0, 0], A[0, 1], A[0, 2]], [A[1, 0], A[1, 1], A[1, 2]],
                       [A[2, 0], A[2, 1], A[2, 2]]]), ti.Vector([A[0, 3], A[1, 3], A[2, 3]]))


@ti.kernel
def set_poses(pose: ti.template(), seeds: ti.template(), pose_src: ti.types.ndarray(ndim=2),
              seed_src: ti.types.ndarray(ndim=1)):
    """pose (B, 6) [t mm, rotvec rad] and seeds (B,) i32 fields from NumPy arrays of the same
    shapes (one small kernel per frame; cheaper to prepare than a generic upload kernel)."""
    for b in range(pose.shape[0]):
        for k in ti.static(range(6)):
            pose[b, k] = pose_src[b, k]
        seeds[b] = seed_src[b]


@ti.kernel
def make_rays(pose: ti.template(), line_o: ti.template(), line_d: ti.template(),
              w2v: ti.template(), ro: ti.template(), rd: ti.template(),
              vo: ti.template(), vd: ti.template()):
    """pose (B, 6) [t mm, rotvec rad] per frame; line_o/line_d (R,) probe-frame vec3; w2v () 4x4
    world->voxel. Writes, for ray r = b R + l (line l of frame b), ro/rd (B R,) (world mm, unit)
    and vo/vd (voxel index, voxels per mm)."""
    for r in ro:
        R_ = line_o.shape[0]
        b, l = r // R_, r % R_
        R, t = pose_transform(pose, b)
        o = mat3_vec(R, line_o[l]) + t
        d = mat3_vec(R, line_d[l])
        ro[r] = o
        rd[r] = d
        M, c = voxel_affine(w2v[None])
        vo[r] = mat3_vec(M, o) + c
        vd[r] = mat3_vec(M, d)
