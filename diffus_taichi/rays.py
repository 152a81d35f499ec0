"""Probe rays from the pose: the only kernel that reads the pose field (notes 2.6).

For each scan line r: world origin ``ro[r]`` (mm) and unit direction ``rd[r]``, and the same ray
in voxel index coordinates (``vo[r]`` and ``vd[r]`` = voxel displacement per mm along the ray).
"""

import taichi as ti


@ti.func
def rodrigues(w):
    """Rotation vector (radians) -> 3x3 rotation matrix; smooth at w = 0."""
    th = ti.sqrt(w.dot(w) + 1e-20)
    k = w / th
    K = ti.Matrix([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return ti.Matrix.identity(float, 3) + ti.sin(th) * K + (1.0 - ti.cos(th)) * (K @ K)


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
        w = ti.Vector([pose[b, 3], pose[b, 4], pose[b, 5]])
        t = ti.Vector([pose[b, 0], pose[b, 1], pose[b, 2]])
        R = rodrigues(w)
        o = R @ line_o[l] + t
        d = R @ line_d[l]
        ro[r] = o
        rd[r] = d
        A = w2v[None]
        M = ti.Matrix([[A[0, 0], A[0, 1], A[0, 2]], [A[1, 0], A[1, 1], A[1, 2]],
                       [A[2, 0], A[2, 1], A[2, 2]]])
        b_ = ti.Vector([A[0, 3], A[1, 3], A[2, 3]])
        vo[r] = M @ o + b_
        vd[r] = M @ d
