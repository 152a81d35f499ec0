"""Real-time demo: move a virtual probe through a volume and watch the ultrasound live (GGUI).

    diffus-taichi demo [--volume brain|phantom|PATH] [--probe ...] [--arch cpu|vulkan|cuda]
    diffus-taichi demo --headless --frames 300 [--record DIR] [--path scripted]
    python demos/realtime.py ...                     (same options)

One ``ti.ui.Window`` shows the live B-mode fan (with a depth ruler and a lateral scale in mm),
the MRI resliced in the current image plane with the fan outline, a 3-D view (volume as a
point cloud, probe axes, fan outline; orbit with the right mouse button), a control panel and
a status line with the pose and the time per stage. Keys (probe frame, fixed steps):
W/S axial +/-, A/D lateral -/+, Q/E elevation -/+; Up/Down tilt about the lateral axis,
Left/Right rock about the elevation axis, Z/X twist about the axial axis; R reset, P
screenshot, Space freeze, Esc quit. Every pose change is logged at INFO as
``pose: tx,ty,tz,rx,ry,rz`` (:meth:`Pose.to_string`: mm and rotation-vector degrees).

Per frame all image work is done by Taichi kernels: ``Simulator.forward`` (ultrasound),
:class:`~diffus_taichi.reslice.Reslicer` (MRI plane, only when the pose or probe changed) and
one composition kernel that writes the fan and the reslice (with its outline overlay) into the
packed RGBA window image; static decorations (rulers, panel frames) are drawn once per probe,
and the 3-D point cloud is splatted into the image by a kernel when the camera turns (the
probe axes and fan outline are scene lines seen by the same ``ti.ui.Camera``).
"""

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from .pose import Pose
from .probe import Probe

log = logging.getLogger(__name__)

# taichi is imported lazily (load_taichi) so that building the CLI parser stays light: importing
# it prints a banner and takes ~0.5 s, and the package never imports it at import time.
ti = None
compose_kernel = unpack_kernel = billboard_kernel = splat_kernel = None

DEFAULT_WINDOW = (1280, 720)
ECHO_MODELS = ("primary", "layered", "reverb")
MAPPINGS = ("auto", "tissue", "transfer", "t2")

BG = (18, 20, 24)
PANEL_3D_BG = (30, 33, 40)
FRAME = (70, 74, 82)
RULER = (200, 200, 200)
OUTLINE = (255, 176, 0)

# probe-frame key bindings: key -> (translation direction, rotation axis) in units of one step
MOVE_KEYS = {"w": (0, 0, 1), "s": (0, 0, -1), "d": (1, 0, 0), "a": (-1, 0, 0),
             "e": (0, 1, 0), "q": (0, -1, 0)}
TURN_KEYS = {"Up": (-1, 0, 0), "Down": (1, 0, 0), "Right": (0, 1, 0), "Left": (0, -1, 0),
             "z": (0, 0, 1), "x": (0, 0, -1)}


# ------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------
def load_taichi():
    """Import taichi and define this module's kernels (once)."""
    global ti, compose_kernel, unpack_kernel, billboard_kernel, splat_kernel
    if compose_kernel is not None:
        return
    import taichi

    ti = taichi

    @ti.func
    def _bilinear(img: ti.template(), y, x):
        H, W = img.shape[0], img.shape[1]
        yc = ti.min(ti.max(y, 0.0), H - 1.0)
        xc = ti.min(ti.max(x, 0.0), W - 1.0)
        y0 = ti.min(ti.cast(ti.floor(yc), ti.i32), H - 2)
        x0 = ti.min(ti.cast(ti.floor(xc), ti.i32), W - 2)
        fy, fx = yc - y0, xc - x0
        a = img[y0, x0] + fx * (img[y0, x0 + 1] - img[y0, x0])
        b = img[y0 + 1, x0] + fx * (img[y0 + 1, x0 + 1] - img[y0 + 1, x0])
        return a + fy * (b - a)

    @ti.func
    def _grey(v):
        g = ti.cast(ti.min(ti.max(v, 0.0), 1.0) * 255.0 + 0.5, ti.u32)
        return g | (g << 8) | (g << 16) | ti.u32(0xFF000000)

    @ti.func
    def _fan_px(fan: ti.template(), fan_exact: ti.template(), u, v, step):
        val = 0.0
        if ti.static(fan_exact):
            val = fan[v, u]
        else:
            val = _bilinear(fan, (v + 0.5) * step - 0.5, (u + 0.5) * step - 0.5)
        return _grey(val)

    @ti.func
    def _mri_px(mri: ti.template(), outline: ti.template(), u, v, step, lo, gain, outline_rgba):
        px = outline_rgba
        if outline[v, u] == 0:
            val = _bilinear(mri, (v + 0.5) * step - 0.5, (u + 0.5) * step - 0.5)
            px = _grey((val - lo) * gain)
        return px

    @ti.kernel
    def _compose_kernel(fan: ti.template(), fan_exact: ti.template(), fx0: ti.i32, fy0: ti.i32,
                        fw: ti.i32, fh: ti.i32, fan_step: ti.f32,
                        mri: ti.template(), outline: ti.template(), rx0: ti.i32, ry0: ti.i32,
                        rw: ti.i32, rh: ti.i32, mri_step: ti.f32, lo: ti.f32, gain: ti.f32,
                        outline_rgba: ti.u32, do_mri: ti.i32, tile: ti.template(),
                        buf: ti.types.ndarray(dtype=ti.u32, ndim=2)):
        """Write the fan (grey, 1:1 or bilinear) and the MRI reslice (grey window [lo, lo+1/gain]
        with the fan outline) into the packed RGBA window image buf[x, y] (y up). Panel
        rectangles are given top-left origin in window pixels; the MRI panel is only redrawn
        when do_mri != 0 (it changes only with the pose or the probe).

        One thread per tile x tile block (tile = 16 on CPU: buf is x-major while the images are
        row-major, and a plain 2-D loop would miss the cache on every write; tile = 1 on GPUs,
        consecutive threads along y)."""
        top = buf.shape[1] - 1
        ftx, fty = (fw + tile - 1) // tile, (fh + tile - 1) // tile
        rtx, rty = (rw + tile - 1) // tile, (rh + tile - 1) // tile
        if do_mri == 0:
            rtx, rty = 0, 0
        for t in range(ftx * fty + rtx * rty):
            if t < ftx * fty:
                u0, v0 = (t // fty) * tile, (t % fty) * tile
                for du in range(tile):
                    for dv in range(tile):
                        u, v = u0 + du, v0 + dv
                        if u < fw and v < fh:
                            buf[fx0 + u, top - (fy0 + v)] = _fan_px(fan, fan_exact, u, v, fan_step)
            else:
                q = t - ftx * fty
                u0, v0 = (q // rty) * tile, (q % rty) * tile
                for du in range(tile):
                    for dv in range(tile):
                        u, v = u0 + du, v0 + dv
                        if u < rw and v < rh:
                            buf[rx0 + u, top - (ry0 + v)] = _mri_px(
                                mri, outline, u, v, mri_step, lo, gain, outline_rgba)

    @ti.kernel
    def _unpack_kernel(buf: ti.types.ndarray(dtype=ti.u32, ndim=2), img: ti.template()):
        """Packed RGBA (fallback path) -> u8 RGB field for ``canvas.set_image``."""
        for x, y in img:
            p = buf[x, y]
            img[x, y] = ti.Vector([ti.cast(p & 0xFF, ti.u8), ti.cast((p >> 8) & 0xFF, ti.u8),
                                   ti.cast((p >> 16) & 0xFF, ti.u8)])

    @ti.kernel
    def _billboard_kernel(centres: ti.template(), colors: ti.template(),
                          right: ti.types.vector(3, ti.f32), up: ti.types.vector(3, ti.f32),
                          fwd: ti.types.vector(3, ti.f32), size: ti.f32,
                          verts: ti.template(), vcol: ti.template(), normals: ti.template()):
        """One camera-facing triangle per point (cheaper than GGUI particles on a software
        rasteriser), shaded darker with distance along the view direction."""
        for i in centres:
            c = centres[i]
            shade = 1.0 - 0.45 * ti.min(ti.max((c.dot(fwd) + 1.0) * 0.5, 0.0), 1.0)
            verts[3 * i] = c + up * size
            verts[3 * i + 1] = c - right * (0.866 * size) - up * (0.5 * size)
            verts[3 * i + 2] = c + right * (0.866 * size) - up * (0.5 * size)
            for k in ti.static(range(3)):
                vcol[3 * i + k] = colors[i] * shade
                normals[3 * i + k] = -fwd

    @ti.kernel
    def _splat_kernel(centres: ti.template(), colors: ti.template(),
                      right: ti.types.vector(3, ti.f32), up: ti.types.vector(3, ti.f32),
                      fwd: ti.types.vector(3, ti.f32), inv_px: ti.f32, zbuf: ti.template(),
                      x0: ti.i32, y0: ti.i32, bg_rgba: ti.u32,
                      buf: ti.types.ndarray(dtype=ti.u32, ndim=2)):
        """Orthographic point splatting into the 3-D panel of the window image, matching the
        scene camera (glm lookAt + ortho as set up by View3D): 2x2-pixel points, nearest wins
        (atomic_min of depth << 18 | point index), shaded darker with depth."""
        pw, ph = zbuf.shape[0], zbuf.shape[1]
        for x, y in zbuf:
            zbuf[x, y] = ti.u32(0xFFFFFFFF)
        for i in centres:
            c = centres[i]
            px = pw * 0.5 + c.dot(right) * inv_px
            py = ph * 0.5 - c.dot(up) * inv_px                     # row from the top
            dq = ti.cast(ti.min(ti.max((c.dot(fwd) + 2.0) * 0.25, 0.0), 1.0) * 16383.0, ti.u32)
            key = (dq << 18) | ti.cast(i & 0x3FFFF, ti.u32)
            ix, iy = ti.cast(ti.floor(px - 0.5), ti.i32), ti.cast(ti.floor(py - 0.5), ti.i32)
            for dx, dy in ti.static(ti.ndrange(2, 2)):
                qx, qy = ix + dx, iy + dy
                if 0 <= qx < pw and 0 <= qy < ph:
                    ti.atomic_min(zbuf[qx, qy], key)
        top = buf.shape[1] - 1
        for x, y in zbuf:
            key = zbuf[x, y]
            out = bg_rgba
            if key != ti.u32(0xFFFFFFFF):
                i = ti.cast(key & ti.u32(0x3FFFF), ti.i32)
                d = ti.cast(key >> 18, ti.f32) / 16383.0 * 4.0 - 2.0
                shade = 1.0 - 0.5 * ti.min(ti.max((d + 1.0) * 0.5, 0.0), 1.0)
                col = colors[i] * shade
                r = ti.cast(ti.min(ti.max(col[0], 0.0), 1.0) * 255.0 + 0.5, ti.u32)
                g = ti.cast(ti.min(ti.max(col[1], 0.0), 1.0) * 255.0 + 0.5, ti.u32)
                b = ti.cast(ti.min(ti.max(col[2], 0.0), 1.0) * 255.0 + 0.5, ti.u32)
                out = r | (g << 8) | (b << 16) | ti.u32(0xFF000000)
            buf[x0 + x, top - (y0 + y)] = out

    compose_kernel, unpack_kernel = _compose_kernel, _unpack_kernel
    billboard_kernel, splat_kernel = _billboard_kernel, _splat_kernel


# ------------------------------------------------------------------------------------------
# layout and static decorations
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rect:
    """Window rectangle, top-left origin, pixels."""
    x: int
    y: int
    w: int
    h: int

    def frac(self, W, H):
        return self.x / W, self.y / H, self.w / W, self.h / H

    def as_dict(self):
        return {"x": self.x, "y": self.y, "w": self.w, "h": self.h}


@dataclass(frozen=True)
class Layout:
    """Panels of the window: fan (1:1 when it fits), MRI reslice, 3-D view, controls, status."""
    size: tuple
    fan_box: Rect
    fan: Rect
    mri: Rect
    view3d: Rect
    controls: Rect
    status: Rect
    fan_scale: float      # displayed px per fan px
    mri_scale: float

    @classmethod
    def compute(cls, size, image_px) -> "Layout":
        W, H = int(size[0]), int(size[1])
        ih, iw = int(image_px[0]), int(image_px[1])
        ruler, gap, ctrl_w, bottom = 46, 14, 300, 190
        box = int(min(H - bottom - 10, (W - ruler - gap - 8 - ctrl_w) / 1.75))
        box = max(box, 64)
        if max(ih, iw) <= box and max(ih, iw) >= 0.9 * box:
            box = max(ih, iw)            # show the fan 1:1 when it (nearly) fits
        fs = min(box / ih, box / iw)
        fw, fh = int(round(iw * fs)), int(round(ih * fs))
        fan_box = Rect(ruler, 8, box, box)
        fan = Rect(ruler + (box - fw) // 2, 8, fw, fh)
        mbox = int(box * 0.75)
        ms = min(mbox / ih, mbox / iw)
        mw, mh = int(round(iw * ms)), int(round(ih * ms))
        mx = ruler + box + gap
        mri = Rect(mx + (mbox - mw) // 2, 8, mw, mh)
        v3y = 8 + mbox + 8
        view3d = Rect(mx, v3y, mbox, max(64, H - v3y - 8))
        cx = mx + mbox + 8
        controls = Rect(cx, 0, W - cx, min(H, 445))     # small imgui windows: cheaper
        sy = fan_box.y + fan_box.h + 34
        status = Rect(0, sy, mx - 6, min(H - sy, 96))
        return cls((W, H), fan_box, fan, mri, view3d, controls, status, fs, ms)

    def as_dict(self):
        return {"window": list(self.size), "fan": self.fan.as_dict(), "mri": self.mri.as_dict(),
                "view3d": self.view3d.as_dict(), "fan_scale": self.fan_scale,
                "mri_scale": self.mri_scale}


_FONT = {  # 3x5 bitmap digits (rows top to bottom)
    "0": ["###", "#.#", "#.#", "#.#", "###"], "1": [".#.", "##.", ".#.", ".#.", "###"],
    "2": ["###", "..#", "###", "#..", "###"], "3": ["###", "..#", "###", "..#", "###"],
    "4": ["#.#", "#.#", "###", "..#", "..#"], "5": ["###", "#..", "###", "..#", "###"],
    "6": ["###", "#..", "###", "#.#", "###"], "7": ["###", "..#", "..#", "..#", "..#"],
    "8": ["###", "#.#", "###", "#.#", "###"], "9": ["###", "#.#", "###", "..#", "###"],
    "-": ["...", "...", "###", "...", "..."], " ": ["...", "...", "...", "...", "..."],
    "m": [".....", ".....", "####.", "#.#.#", "#.#.#"],
}


class _Painter:
    """Tiny raster painter on an (H, W, 3) uint8 image, top-left origin (static layer only)."""

    def __init__(self, W, H, color=BG):
        self.img = np.empty((H, W, 3), np.uint8)
        self.img[:] = color

    def rect(self, x, y, w, h, color):
        H, W = self.img.shape[:2]
        x0, y0, x1, y1 = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
        if x1 > x0 and y1 > y0:
            self.img[y0:y1, x0:x1] = color

    def frame(self, r: Rect, color=FRAME):
        self.rect(r.x - 1, r.y - 1, r.w + 2, 1, color)
        self.rect(r.x - 1, r.y + r.h, r.w + 2, 1, color)
        self.rect(r.x - 1, r.y - 1, 1, r.h + 2, color)
        self.rect(r.x + r.w, r.y - 1, 1, r.h + 2, color)

    def text(self, x, y, s, color=RULER, scale=2):
        for ch in s:
            g = _FONT.get(ch, _FONT[" "])
            for r, row in enumerate(g):
                for c, on in enumerate(row):
                    if on == "#":
                        self.rect(x + c * scale, y + r * scale, scale, scale, color)
            x += (len(g[0]) + 1) * scale

    @staticmethod
    def text_width(s, scale=2):
        return sum((len(_FONT.get(ch, _FONT[" "])[0]) + 1) * scale for ch in s) - scale

    def packed(self) -> np.ndarray:
        """(W, H) uint32 RGBA, x-major with y up (the GGUI set_image layout)."""
        a = self.img.astype(np.uint32)
        p = a[..., 0] | (a[..., 1] << 8) | (a[..., 2] << 16) | np.uint32(0xFF000000)
        return np.ascontiguousarray(p[::-1].T)


def _nice_step(span_mm, target_ticks=8):
    raw = span_mm / max(target_ticks, 1)
    for s in (1, 2, 5, 10, 20, 25, 50, 100, 200):
        if s >= raw:
            return s
    return 500


def static_layer(layout: Layout, probe: Probe) -> np.ndarray:
    """Background with panel frames, a depth ruler (mm) left of the fan and a lateral scale (mm)
    below it; returned packed (W, H) uint32."""
    W, H = layout.size
    p = _Painter(W, H)
    p.frame(layout.fan_box)
    p.frame(layout.mri)
    p.rect(layout.view3d.x, layout.view3d.y, layout.view3d.w, layout.view3d.h, PANEL_3D_BG)
    p.frame(layout.view3d)
    x, z = probe.fan_axes_mm()
    px_mm = probe.fan_pixel_mm() / layout.fan_scale      # mm per displayed pixel
    f = layout.fan
    z_top = z[0] - probe.fan_pixel_mm() / 2              # depth at the top edge of the fan
    x_left = x[0] - probe.fan_pixel_mm() / 2
    # depth ruler
    major = _nice_step(z[-1] - z_top, 7)
    minor = major / 5 if major % 5 == 0 else major / 2
    rx = f.x - 6
    p.rect(rx, f.y, 1, f.h, RULER)
    k0 = math.ceil(z_top / minor)
    for k in range(k0, int((z_top + f.h * px_mm) / minor) + 1):
        d = k * minor
        row = f.y + int(round((d - z_top) / px_mm))
        if not f.y <= row < f.y + f.h:
            continue
        is_major = abs(d / major - round(d / major)) < 1e-6
        ln = 6 if is_major else 3
        p.rect(rx - ln, row, ln, 1, RULER)
        if is_major:
            s = f"{int(round(d))}"
            p.text(rx - 8 - p.text_width(s), max(row - 4, 0), s)
    # lateral scale under the fan (0 = probe axis)
    ry = layout.fan_box.y + layout.fan_box.h + 6
    p.rect(f.x, ry, f.w, 1, RULER)
    stepx = _nice_step(f.w * px_mm, 6)
    for k in range(math.ceil(x_left / stepx), int((x_left + f.w * px_mm) / stepx) + 1):
        col = f.x + int(round((k * stepx - x_left) / px_mm))
        if f.x <= col < f.x + f.w:
            p.rect(col, ry, 1, 6, RULER)
            s = f"{int(round(k * stepx))}"
            p.text(col - p.text_width(s) // 2, ry + 9, s)
    p.text(4, ry + 9, "mm")                               # unit of both rulers
    return p.packed()


# ------------------------------------------------------------------------------------------
# 3-D view
# ------------------------------------------------------------------------------------------
def _world_to_scene(pts_mm, centre, scale):
    """World mm (x right, y anterior, z superior) -> scene units with y up."""
    q = (np.asarray(pts_mm, dtype=np.float64) - centre) / scale
    return np.stack([q[..., 0], q[..., 2], -q[..., 1]], -1)


def volume_point_cloud(volume, n_points=4000, seed=0):
    """(n, 3) world mm points on the surface of the volume's main content (brain tissue if
    tissue channels exist) and (n,) display intensity, subsampled at random."""
    names = volume.channel_names
    inner = [n for n in ("grey_matter", "white_matter", "tumour") if n in names]
    if inner:
        content = sum(volume.channel(n) for n in inner)
        mask = content > 0.5
    else:
        d = volume.display_channel()
        hi = float(np.percentile(d[d > 0], 99)) if np.any(d > 0) else 1.0
        mask = d > 0.3 * hi
    if not mask.any():
        mask = np.ones(volume.shape, bool)
    core = mask.copy()
    for ax in range(3):
        for sh in (1, -1):
            core &= np.roll(mask, sh, axis=ax)
    shell = mask & ~core
    idx = np.argwhere(shell if shell.any() else mask)
    rng = np.random.default_rng(seed)
    if len(idx) > n_points:
        idx = idx[rng.choice(len(idx), n_points, replace=False)]
    disp = volume.display_channel()
    val = disp[idx[:, 0], idx[:, 1], idx[:, 2]]
    return volume.voxel_to_world(idx.astype(np.float64)), val


class View3D:
    """3-D view of the volume (point cloud), the probe axes and the fan outline, seen by an
    orthographic ``ti.ui.Camera`` whose frustum puts the volume in the layout's 3-D panel.

    The axes and the outline are ``window.get_scene()`` lines. The point cloud is drawn either
    (``cloud='splat'``, default) by a Taichi kernel that projects the points with the same
    camera into the window image (z-buffered 2x2 splats, only recomputed when the camera
    turns: free per frame, so many more points are affordable), or (``cloud='scene'``) as
    camera-facing triangles in the scene (``scene.mesh``): on the lavapipe software rasteriser
    every scene primitive costs ~1-2 us per frame (GGUI particles ~2 us, triangles ~1 us)."""

    AXIS_MM = 18.0
    POINT_PX = 2.0          # half size of a scene-mode point (pixels)

    def __init__(self, volume, layout: Layout, n_points=12000, pose: "Pose | None" = None,
                 cloud="splat"):
        if cloud not in ("splat", "scene"):
            raise ValueError(f"cloud must be 'splat' or 'scene', got {cloud!r}")
        self.cloud = cloud
        self.zbuf = None
        pts, val = volume_point_cloud(volume, n_points)
        self.centre = pts.mean(0) if len(pts) else volume.centre_mm
        self.scale = float(max(np.linalg.norm(pts - self.centre, axis=1).max(), 1.0)) \
            if len(pts) else 100.0
        self.radius = 1.08           # scene units that must stay inside the panel
        self.n_points = len(pts)
        n = max(len(pts), 1)
        self.points = ti.Vector.field(3, ti.f32, shape=n)
        self.colors = ti.Vector.field(3, ti.f32, shape=n)
        if len(pts):
            self.points.from_numpy(_world_to_scene(pts, self.centre, self.scale).astype(np.float32))
            hi = float(np.percentile(val, 99)) if np.any(val > 0) else 1.0
            t = np.clip(val / max(hi, 1e-6), 0, 1)[:, None]
            c = (1 - t) * np.array([0.55, 0.60, 0.80]) + t * np.array([1.0, 0.90, 0.85])
            self.colors.from_numpy(c.astype(np.float32))
        self.tri_v = ti.Vector.field(3, ti.f32, shape=3 * n)
        self.tri_c = ti.Vector.field(3, ti.f32, shape=3 * n)
        self.tri_n = ti.Vector.field(3, ti.f32, shape=3 * n)
        self._billboard_key = None
        self.n_outline = 48
        nl = 6 + 2 * self.n_outline
        self.lines = ti.Vector.field(3, ti.f32, shape=nl)
        self.line_colors = ti.Vector.field(3, ti.f32, shape=nl)
        lc = np.zeros((nl, 3), np.float32)
        lc[0:2], lc[2:4], lc[4:6] = (1, 0.25, 0.25), (0.3, 1, 0.3), (0.35, 0.6, 1)
        lc[6:] = np.array(OUTLINE) / 255.0
        self.line_colors.from_numpy(lc)
        self.camera = ti.ui.Camera()
        self.camera.projection_mode(ti.ui.ProjectionMode.Orthogonal)
        self.camera.up(0.0, 1.0, 0.0)
        self.camera.z_near(0.01)
        self.camera.z_far(100.0)
        self.distance = 5.0
        self.set_layout(layout)
        self.reset_camera(pose)

    def set_layout(self, layout: Layout):
        W, H = layout.size
        r = layout.view3d
        self.units_per_px = 2.0 * self.radius / max(min(r.w, r.h), 1)
        s = self.units_per_px
        cx = r.x + r.w / 2.0
        cy = H - (r.y + r.h / 2.0)          # from the bottom
        self.camera.left(-s * cx)
        self.camera.right(s * (W - cx))
        # Taichi passes (top, bottom) as glm's (bottom, top): these put scene +y up
        self.camera.top(-s * cy)
        self.camera.bottom(s * (H - cy))
        self._billboard_key = None
        self._splat_key = None
        if self.cloud == "splat" and (self.zbuf is None or tuple(self.zbuf.shape) != (r.w, r.h)):
            self.zbuf = ti.field(ti.u32, shape=(r.w, r.h))
        self.rect = r

    def camera_basis(self):
        """(right, up, forward) unit vectors of the camera (glm::lookAt conventions)."""
        pos = np.array([float(self.camera.curr_position[i]) for i in range(3)])
        look = np.array([float(self.camera.curr_lookat[i]) for i in range(3)])
        f = look - pos
        f /= max(np.linalg.norm(f), 1e-12)
        r = np.cross(f, [0.0, 1.0, 0.0])
        if np.linalg.norm(r) < 1e-6:
            r = np.array([1.0, 0.0, 0.0])
        r /= np.linalg.norm(r)
        return r, np.cross(r, f), f

    def invalidate(self):
        """Force the point cloud to be drawn again (e.g. the window image was reset)."""
        self._splat_key = None

    def splat(self, buf, bg=PANEL_3D_BG) -> bool:
        """Project the point cloud into the 3-D panel of the packed window image ``buf`` when
        the camera moved (or after :meth:`invalidate`); True if it drew."""
        if self.cloud != "splat":
            return False
        r, u, f = self.camera_basis()
        key = (tuple(np.round(f, 7)), self.units_per_px, self.rect)
        if key == self._splat_key:
            return False
        splat_kernel(self.points, self.colors, ti.Vector(r.tolist()), ti.Vector(u.tolist()),
                     ti.Vector(f.tolist()), 1.0 / self.units_per_px, self.zbuf, self.rect.x,
                     self.rect.y, _pack(bg), buf)
        self._splat_key = key
        return True

    def reset_camera(self, pose: "Pose | None" = None):
        """Look at the volume centre from the right-anterior-superior side (world +x, +y, +z),
        turned towards the probe's side when a pose is given."""
        w = np.array([1.0, 1.0, 0.5])
        if pose is not None:
            side = np.sign(pose.translation_mm[0] - self.centre[0]) or 1.0
            w[0] *= side
        d = _world_to_scene(w, np.zeros(3), 1.0)
        d = d / np.linalg.norm(d)
        self.camera.position(*(d * self.distance))
        self.camera.lookat(0.0, 0.0, 0.0)

    def orbit(self, window):
        """RMB drag orbits about the volume centre (track_user_inputs turns the view
        direction; the camera is then put back on a sphere around the target)."""
        cam = self.camera
        cam.track_user_inputs(window, movement_speed=0.0, yaw_speed=3.0, pitch_speed=3.0,
                              hold_key=ti.ui.RMB)
        front = np.array([cam.curr_lookat[i] - cam.curr_position[i] for i in range(3)])
        nrm = np.linalg.norm(front)
        if nrm > 1e-9:
            front /= nrm
            cam.position(*(-front * self.distance))
            cam.lookat(0.0, 0.0, 0.0)

    def update_probe(self, pose: Pose, probe: Probe):
        o = np.zeros(3)
        axes = np.eye(3) * self.AXIS_MM
        seg = []
        for a in axes:
            seg += [o, a]
        ol = probe.outline_mm(self.n_outline // 2 if probe.kind == "curvilinear" else 0)
        ol3 = np.stack([ol[:, 0], np.zeros(len(ol)), ol[:, 1]], 1)
        # resample the closed outline to exactly n_outline segments
        d = np.r_[0, np.cumsum(np.linalg.norm(np.diff(ol3, axis=0), axis=1))]
        t = np.linspace(0, d[-1], self.n_outline + 1)
        res = np.stack([np.interp(t, d, ol3[:, i]) for i in range(3)], 1)
        for k in range(self.n_outline):
            seg += [res[k], res[k + 1]]
        world = pose.probe_to_world(np.array(seg))
        self.lines.from_numpy(_world_to_scene(world, self.centre, self.scale).astype(np.float32))

    def _update_billboards(self):
        pos = tuple(float(self.camera.curr_position[i]) for i in range(3))
        key = (pos, self.units_per_px)
        if key == self._billboard_key:
            return
        fwd = -np.asarray(pos) / max(np.linalg.norm(pos), 1e-9)
        right = np.cross(fwd, [0.0, 1.0, 0.0])
        if np.linalg.norm(right) < 1e-6:
            right = np.array([1.0, 0.0, 0.0])
        right /= np.linalg.norm(right)
        up = np.cross(right, fwd)
        billboard_kernel(self.points, self.colors, ti.Vector(right.tolist()),
                         ti.Vector(up.tolist()), ti.Vector(fwd.tolist()),
                         self.POINT_PX * self.units_per_px, self.tri_v, self.tri_c, self.tri_n)
        self._billboard_key = key

    def draw(self, scene, canvas):
        scene.set_camera(self.camera)
        scene.ambient_light((1.0, 1.0, 1.0))
        if self.n_points and self.cloud == "scene":
            self._update_billboards()
            scene.mesh(self.tri_v, normals=self.tri_n, per_vertex_color=self.tri_c,
                       two_sided=True)
        scene.lines(self.lines, width=3.0, per_vertex_color=self.line_colors)
        canvas.scene(scene)


# ------------------------------------------------------------------------------------------
# the app
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RebuildParams:
    """Settings that need a new Simulator when they change."""
    probe: Probe
    echo_model: str
    mapping: str


class FrameTimer:
    """Per-stage wall times: running mean for the display, sums for the final report."""

    STAGES = ("simulate", "reslice", "draw")

    def __init__(self):
        self.ema = {k: 0.0 for k in self.STAGES}
        self.ema_frame = 0.0
        self.sums = {k: 0.0 for k in self.STAGES}
        self.n = 0
        self.t_first_end = None
        self.t_last_end = None

    def add(self, stage, dt):
        if self.t_first_end is None:            # the first frame (JIT) is excluded
            return
        self.ema[stage] = dt if self.ema[stage] == 0 else 0.9 * self.ema[stage] + 0.1 * dt
        self.sums[stage] += dt

    def end_frame(self):
        now = time.perf_counter()
        cpu = time.process_time()
        if self.t_first_end is None:
            self.cpu_first_end = cpu
        self.cpu_last_end = cpu
        if self.t_last_end is not None:
            dt = now - self.t_last_end
            self.ema_frame = dt if self.ema_frame == 0 else 0.9 * self.ema_frame + 0.1 * dt
        if self.t_first_end is None:
            self.t_first_end = now
        else:
            self.n += 1
        self.t_last_end = now

    @property
    def fps(self):
        return 1.0 / self.ema_frame if self.ema_frame > 0 else 0.0

    def mean_fps(self):
        if not self.n:
            return float("nan")
        return self.n / (self.t_last_end - self.t_first_end)

    def cpu_ms_per_frame(self):
        """Process CPU time (all threads) per frame: independent of other load on the machine."""
        return 1e3 * (self.cpu_last_end - self.cpu_first_end) / self.n if self.n else float("nan")

    def mean_ms(self, stage):
        return 1e3 * self.sums[stage] / self.n if self.n else float("nan")


def scripted_pose(base: Pose, k: int, lateral_mm=4.0, tilt_deg=6.0, period=90) -> Pose:
    """Scripted probe path: sinusoidal lateral sweep and a slower tilt about the lateral axis."""
    ph = 2 * math.pi * k / period
    return base.moved((lateral_mm * math.sin(ph), 0.0, 0.0),
                      (math.radians(tilt_deg) * math.sin(ph * 2 / 3), 0.0, 0.0))


class DemoApp:
    """The real-time demo. ``DemoApp(args).run()``; see :func:`add_demo_parser` for args."""

    def __init__(self, args):
        from . import backend
        from .volume import load_volume

        load_taichi()
        self.args = args
        self.headless = bool(args.headless)
        self.arch = backend.ensure(args.arch)
        t0 = time.perf_counter()
        self.volume = load_volume(args.volume)
        self.start_pose = Pose.parse(args.pose) if args.pose else self.volume.default_pose
        self.pose = self.start_pose
        self.step_mm = float(args.step_mm)
        self.step_rad = math.radians(float(args.step_deg))
        from .cli import _probe_from_args
        probe = _probe_from_args(args)
        self.params = RebuildParams(probe, args.echo_model, args.mapping)
        self.pending = self.params
        self.pending_since = 0.0
        self.settings = dict(gain_db=args.gain_db, dynamic_range_db=args.dynamic_range_db,
                             tgc_db_per_cm=args.tgc_db_per_cm, speckle=not args.no_speckle,
                             seed=args.seed)
        self.size = _parse_size(args.window)
        self.window = ti.ui.Window("diffus-taichi: real-time ultrasound", self.size, vsync=False,
                                   show_window=not self.headless, pos=(0, 0))
        self.canvas = self.window.get_canvas()
        self.gui = self.window.get_gui()
        self.scene = self.window.get_scene()
        self.sim = None
        self.reslicer = None
        self.frozen = False
        self.frame = 0
        self.timer = FrameTimer()
        self.n_rebuilds = 0
        self._build(self.params)
        self.view3d = View3D(self.volume, self.layout, n_points=args.points, pose=self.start_pose,
                             cloud=args.cloud)
        self.view3d.update_probe(self.pose, self.params.probe)
        # display window of the MRI intensities
        d = self.volume.display_channel()
        nz = d[d > 0]
        hi = float(np.percentile(nz[:: max(1, nz.size // 500000)], 99.5)) if nz.size else 1.0
        self.mri_lo, self.mri_gain = 0.0, 1.0 / max(hi, 1e-6)
        self.screenshot_dir = args.screenshot_dir
        self._want_screenshot = False
        self._n_shots = 0
        self._log_pose()
        log.info("demo set up in %.2f s: volume %s, probe %s %dx%d, arch %s, window %dx%d%s",
                 time.perf_counter() - t0, self.volume.name, probe.name, probe.n_lines,
                 probe.n_samples, self.arch, *self.size, " (headless)" if self.headless else "")

    # --- simulator / geometry ------------------------------------------------------------
    def _build(self, params: RebuildParams):
        from .reslice import Reslicer, fan_inside_mask, outline_from_mask
        from .simulator import Simulator

        t0 = time.perf_counter()
        if self.sim is not None:       # keep the live imaging settings across rebuilds
            self.settings = asdict(self.sim.settings)
        # same mapping: reuse the volume and acoustic-property fields (no second volume copy)
        share = self.sim if (self.sim is not None and params.mapping == self.params.mapping) else None
        sim = Simulator(self.volume, probe=params.probe, mapping=params.mapping,
                        echo_model=params.echo_model, arch=self.arch, share_volume_with=share,
                        **self.settings)
        if self.sim is not None:
            self.n_rebuilds += 1
            if self.n_rebuilds == 1 and share is None:
                log.warning("changing the mapping allocates new volume fields (Taichi fields "
                            "are not freed)")
        self.sim = sim
        self.sim.set_pose(self.pose)
        self.params = params
        self.pending = params
        if self.reslicer is None:
            self.reslicer = Reslicer(self.volume, params.probe)
        else:
            self.reslicer.set_probe(params.probe)
        self.layout = Layout.compute(self.size, params.probe.image_px)
        L = self.layout
        self.fan_exact = abs(L.fan_scale - 1.0) < 1e-9
        outline = outline_from_mask(fan_inside_mask(params.probe, (L.mri.h, L.mri.w)), 2)
        self.outline = ti.field(ti.u8, shape=(L.mri.h, L.mri.w))
        self.outline.from_numpy(outline.astype(np.uint8))
        static = static_layer(L, params.probe)
        self._alloc_image(static)
        if hasattr(self, "view3d"):
            self.view3d.set_layout(L)
            self.view3d.update_probe(self.pose, params.probe)
            self.view3d.invalidate()
        self._mri_pose = None          # force a reslice
        self._mri_dirty = True
        log.info("simulator built in %.2f s: %s %dx%d, %.1f MHz, depth %.0f mm, %s, mapping %s",
                 time.perf_counter() - t0, params.probe.name, params.probe.n_lines,
                 params.probe.n_samples, params.probe.frequency_mhz, params.probe.depth_mm,
                 params.echo_model, params.mapping)

    def _alloc_image(self, static: np.ndarray):
        """Packed RGBA window image, filled with the static layer. On CPU a numpy array (the
        kernel writes it in place and GGUI copies it from host memory); on GPU backends a
        ti.ndarray copied to the host once per frame (Taichi 1.7.4 cannot hand an Ndarray to
        GGUI directly: ``Ndarray.get_device_allocation`` is missing from its bindings)."""
        if self.arch == "cpu":
            self.buf = static.copy()
        else:
            if getattr(self, "buf", None) is None or tuple(self.buf.shape) != static.shape:
                self.buf = ti.ndarray(ti.u32, shape=static.shape)
            self.buf.from_numpy(static)
        self._fast_set_image = True
        self._unpacked = None

    def _set_image(self):
        host = self.buf if isinstance(self.buf, np.ndarray) else None
        if self._fast_set_image:
            try:
                from taichi.ui.utils import get_field_info

                if host is None:
                    host = self.buf.to_numpy()
                self._host_image = host          # GGUI copies it during set_image
                self.canvas.canvas.set_image(get_field_info(host))
                return
            except Exception as e:  # pragma: no cover - other taichi versions
                log.warning("fast set_image path unavailable (%s); using canvas.set_image", e)
                self._fast_set_image = False
        if self._unpacked is None:
            self._unpacked = ti.Vector.field(3, ti.u8, shape=self.size)
        unpack_kernel(self.buf, self._unpacked)
        self.canvas.set_image(self._unpacked)

    # --- pose ------------------------------------------------------------------------------
    def set_pose(self, pose: Pose, quiet=False):
        """Move the probe; logs ``pose: ...`` at INFO (DEBUG for the scripted path)."""
        if pose != self.pose:
            self.pose = pose
            self._log_pose(logging.DEBUG if quiet else logging.INFO)

    def _log_pose(self, level=logging.INFO):
        log.log(level, "pose: %s", self.pose.to_string())

    def move(self, d_mm=(0, 0, 0), d_rot=(0, 0, 0)):
        self.set_pose(self.pose.moved(np.asarray(d_mm, float) * self.step_mm,
                                      np.asarray(d_rot, float) * self.step_rad))

    def handle_key(self, key: str) -> bool:
        """Apply one key press; False when the app should quit."""
        k = key.lower() if len(key) == 1 else key
        if k in MOVE_KEYS:
            self.move(d_mm=MOVE_KEYS[k])
        elif k in TURN_KEYS:
            self.move(d_rot=TURN_KEYS[k])
        elif k == "r":
            self.set_pose(self.start_pose)
        elif k == "p":
            self._want_screenshot = True
        elif k == " ":
            self.frozen = not self.frozen
            log.info("image %s", "frozen" if self.frozen else "live")
        elif k == ti.ui.ESCAPE:
            return False
        return True

    # --- per frame -------------------------------------------------------------------------
    def simulate(self):
        t0 = time.perf_counter()
        if not self.frozen:
            if self.pose != self.sim.last_pose:
                self.sim.set_pose(self.pose)
            self.sim.forward()
            ti.sync()
        self.timer.add("simulate", time.perf_counter() - t0)
        t0 = time.perf_counter()
        if not self.frozen and self._mri_pose != self.pose:   # reslice only when moved
            self.reslicer.update(self.pose)
            ti.sync()
            self._mri_pose = self.pose
            self._mri_dirty = True
        self.timer.add("reslice", time.perf_counter() - t0)

    def compose(self):
        L = self.layout
        compose_kernel(self.sim.fan, self.fan_exact, L.fan.x, L.fan.y, L.fan.w, L.fan.h,
                       1.0 / L.fan_scale, self.reslicer.image, self.outline, L.mri.x, L.mri.y,
                       L.mri.w, L.mri.h, 1.0 / L.mri_scale, self.mri_lo, self.mri_gain,
                       _pack(OUTLINE), int(self._mri_dirty), 16 if self.arch == "cpu" else 1,
                       self.buf)
        self._mri_dirty = False
        self.view3d.splat(self.buf)
        self._set_image()

    def draw_gui(self):
        g, W, H = self.gui, *self.size
        s = self.sim.settings
        p = self.pending
        probe = p.probe
        with g.sub_window("Controls", *self.layout.controls.frac(W, H)):
            g.text("Imaging (live)")
            s.gain_db = g.slider_float("gain dB", float(s.gain_db), -20.0, 60.0)
            s.dynamic_range_db = g.slider_float("range dB", float(s.dynamic_range_db), 10.0, 100.0)
            tgc = self.sim.tgc_db_per_cm
            new_tgc = g.slider_float("TGC dB/cm", float(tgc), 0.0, 20.0)
            if abs(new_tgc - tgc) > 1e-6:
                s.tgc_db_per_cm = new_tgc
            s.speckle = g.checkbox("speckle", bool(s.speckle))
            g.text("Probe (rebuilds the simulator)")
            changes = {
                "frequency_mhz": _slider(g, "freq MHz", probe.frequency_mhz, 1.0, 15.0, 1),
                "depth_mm": _slider(g, "depth mm", probe.depth_mm, 10.0, 150.0, 0)}
            if probe.kind == "curvilinear":
                changes["fov_deg"] = _slider(g, "FOV deg", probe.fov_deg, 10.0, 150.0, 0)
            else:
                changes["width_mm"] = _slider(g, "width mm", probe.width_mm, 10.0, 80.0, 0)
            changes["n_lines"] = int(g.slider_int("lines", int(probe.n_lines), 16, 512))
            echo, mapping = p.echo_model, p.mapping
            if g.button(f"echo model: {echo}"):
                echo = ECHO_MODELS[(ECHO_MODELS.index(echo) + 1) % len(ECHO_MODELS)] \
                    if echo in ECHO_MODELS else ECHO_MODELS[0]
            if g.button(f"mapping: {os.path.basename(mapping)}"):
                mapping = MAPPINGS[(MAPPINGS.index(mapping) + 1) % len(MAPPINGS)] \
                    if mapping in MAPPINGS else MAPPINGS[0]
            self._request(changes, echo, mapping)
            if self.pending != self.params:
                g.text("rebuilding when the sliders rest ...")
            g.text("Probe pose")
            if g.button("reset pose (R)"):
                self.set_pose(self.start_pose)
            if g.button("screenshot (P)"):
                self._want_screenshot = True
            self.frozen = g.checkbox("freeze image (Space)", self.frozen)
            g.text("keys: W/S axial, A/D lateral, Q/E elev.")
            g.text("  arrows, Z/X rotate; RMB drag: 3-D orbit")
        with g.sub_window("Status", *self.layout.status.frac(W, H)):
            t = self.pose.translation_mm
            r = np.degrees(self.pose.rotvec_rad)
            g.text(f"pose t = ({t[0]:.1f}, {t[1]:.1f}, {t[2]:.1f}) mm, "
                   f"rotvec = ({r[0]:.1f}, {r[1]:.1f}, {r[2]:.1f}) deg")
            e = self.timer.ema
            g.text(f"{self.timer.fps:5.1f} fps | simulate {1e3 * e['simulate']:.1f} ms | "
                   f"reslice {1e3 * e['reslice']:.1f} ms | draw {1e3 * e['draw']:.1f} ms")
            pr = self.params.probe
            g.text(f"{self.volume.name} | {pr.name} {pr.n_lines}x{pr.n_samples} "
                   f"{pr.frequency_mhz:g} MHz {pr.depth_mm:g} mm | {self.params.echo_model} | "
                   f"{self.arch} | {100 * getattr(self.sim, 'coverage', 0):.0f} % in volume"
                   f"{' | FROZEN' if self.frozen else ''}")

    def _request(self, changes, echo, mapping):
        try:
            probe = self.pending.probe
            if any(getattr(probe, k) != v for k, v in changes.items()):
                probe = probe.with_(**changes)
            req = RebuildParams(probe, echo, mapping)
        except ValueError as e:
            log.warning("ignored setting: %s", e)
            return
        if req != self.pending:
            self.pending = req
            self.pending_since = time.perf_counter()

    def maybe_rebuild(self):
        if self.pending == self.params:
            return
        if not self.headless:
            if time.perf_counter() - self.pending_since < 0.4 or self.window.is_pressed(ti.ui.LMB):
                return
        old = self.params
        try:
            self._build(self.pending)
        except (ValueError, RuntimeError) as e:
            log.error("cannot apply settings: %s", e)
            self.pending = old

    def close(self):
        """Destroy the window (idempotent)."""
        if getattr(self, "window", None) is not None:
            try:
                self.window.destroy()
            except Exception:  # pragma: no cover
                pass
            self.window = None

    def screenshot_path(self):
        os.makedirs(self.screenshot_dir, exist_ok=True)
        self._n_shots += 1
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return os.path.join(self.screenshot_dir, f"diffus-demo-{stamp}-{self._n_shots:03d}.png")

    def run(self) -> int:
        a = self.args
        n_frames = int(a.frames or 0)
        if self.headless and n_frames <= 0:
            raise ValueError("--headless needs --frames N (N > 0)")
        if a.record:
            os.makedirs(a.record, exist_ok=True)
            import json
            with open(os.path.join(a.record, "layout.json"), "w") as fh:
                json.dump({**self.layout.as_dict(), "probe": repr(self.params.probe)}, fh, indent=1)
        win = self.window
        running = True
        while running and (self.headless or win.running):
            if not self.headless:
                for e in win.get_events(ti.ui.PRESS):
                    if not self.handle_key(e.key):
                        running = False
                self.view3d.orbit(win)
            if a.path == "scripted":
                self.set_pose(scripted_pose(self.start_pose, self.frame), quiet=True)
            self.maybe_rebuild()
            if self.pose != getattr(self, "_drawn_pose", None):
                self.view3d.update_probe(self.pose, self.params.probe)
                self._drawn_pose = self.pose
            self.simulate()
            t0 = time.perf_counter()
            self.compose()
            self.view3d.draw(self.scene, self.canvas)
            self.draw_gui()
            last = n_frames > 0 and self.frame + 1 >= n_frames
            shot = None
            if self._want_screenshot or (last and a.screenshot):
                shot = a.screenshot if (last and a.screenshot) else self.screenshot_path()
                self._want_screenshot = False
            if self.headless:
                img = win.get_image_buffer_as_numpy()      # ends the frame (never show())
                self.timer.add("draw", time.perf_counter() - t0)
                if shot:
                    _write_png(shot, img)
                if a.record:
                    _write_png(os.path.join(a.record, f"frame_{self.frame:05d}.png"), img)
            else:
                if shot:
                    win.save_image(shot)                   # before show()
                if a.record:
                    win.save_image(os.path.join(a.record, f"frame_{self.frame:05d}.png"))
                win.show()
                self.timer.add("draw", time.perf_counter() - t0)
            if shot:
                log.info("screenshot: %s", shot)
            self.timer.end_frame()
            if self.frame == 0:
                log.info("demo ready (first frame in %.2f s)", time.perf_counter() - t0)
            self.frame += 1
            if last:
                break
        self.close()
        T = self.timer
        msg = (f"fps: {T.mean_fps():.1f} over {T.n} frames (first frame excluded); per frame: "
               f"simulate {T.mean_ms('simulate'):.1f} ms, reslice {T.mean_ms('reslice'):.1f} ms, "
               f"draw {T.mean_ms('draw'):.1f} ms; process CPU time {T.cpu_ms_per_frame():.1f} ms "
               f"per frame; arch {self.arch}, "
               f"{self.params.probe.n_lines}x{self.params.probe.n_samples} -> "
               f"{self.params.probe.image_px[1]}x{self.params.probe.image_px[0]} px")
        print(msg, flush=True)
        return 0


def _slider(g, label, value, lo, hi, digits):
    """Float slider for a rebuild parameter: the value is kept exactly while the slider is
    untouched (imgui hands back a float32) and rounded to ``digits`` once it moves."""
    value = float(value)
    new = float(g.slider_float(label, value, lo, hi))
    if abs(new - value) <= 1e-5 * max(1.0, abs(value)):
        return value
    return float(round(new, digits))


def _pack(rgb):
    r, g, b = (int(c) for c in rgb)
    return r | (g << 8) | (b << 16) | 0xFF000000


def _write_png(path, buf):
    """GGUI image buffer (W, H, 4) floats, y up -> RGB PNG."""
    from PIL import Image

    a = np.clip(np.asarray(buf)[..., :3], 0.0, 1.0)
    a = (a * 255.0 + 0.5).astype(np.uint8).transpose(1, 0, 2)[::-1]
    Image.fromarray(np.ascontiguousarray(a)).save(path)


def _parse_size(text):
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"--window must look like 1280x720, got {text!r}") from None
    if not (640 <= w <= 8192 and 400 <= h <= 8192):
        raise ValueError(f"--window {text}: width must be in [640, 8192] and height in [400, 8192]")
    return w, h


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------
def _add_demo_options(p: argparse.ArgumentParser) -> None:
    from .cli import _add_common

    _add_common(p)
    p.add_argument("--pose", default=None,
                   help="start pose 'tx,ty,tz,rx,ry,rz' (mm, rotation vector in degrees) or a 4x4 "
                        "matrix file [default: the volume's default pose]")
    p.add_argument("--headless", action="store_true",
                   help="no window (GGUI show_window=False); needs --frames")
    p.add_argument("--frames", type=int, default=0,
                   help="stop after N frames (0 = until the window is closed)")
    p.add_argument("--record", default=None, metavar="DIR",
                   help="save every frame of the window as DIR/frame_NNNNN.png (+ layout.json)")
    p.add_argument("--path", default="static", choices=["static", "scripted"],
                   help="probe path: static (keys only) or scripted (lateral sweep + tilt)")
    p.add_argument("--window", default=f"{DEFAULT_WINDOW[0]}x{DEFAULT_WINDOW[1]}",
                   help="window size WxH [1280x720]")
    p.add_argument("--points", type=int, default=12000,
                   help="points of the 3-D volume cloud [12000]")
    p.add_argument("--cloud", default="splat", choices=["splat", "scene"],
                   help="draw the 3-D point cloud with a Taichi splatting kernel into the window "
                        "image (splat, only when the camera turns) or as scene triangles "
                        "(scene, every frame) [splat]")
    p.add_argument("--step-mm", type=float, default=1.0, help="translation per key press (mm) [1]")
    p.add_argument("--step-deg", type=float, default=2.0, help="rotation per key press (deg) [2]")
    p.add_argument("--screenshot-dir", default=".", help="where P / the button saves PNGs [.]")
    p.add_argument("--screenshot", default=None, metavar="PNG",
                   help="save a screenshot of the last frame (with --frames) to this file")


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to an argparse subparsers object."""
    d = subparsers.add_parser(
        "demo", help="real-time GGUI app: move the probe and watch the ultrasound live",
        description="Real-time demo: live B-mode fan, MRI reslice with the fan outline, 3-D view "
                    "and controls in one Taichi GGUI window. Keys: W/S axial, A/D lateral, Q/E "
                    "elevation (mm steps); arrows and Z/X rotate (degree steps); R reset, P "
                    "screenshot, Space freeze, Esc quit; right mouse drag orbits the 3-D view.")
    _add_demo_options(d)
    d.set_defaults(func=run_demo)
    return d


def run_demo(args) -> int:
    """Run the demo for parsed ``args`` (from :func:`add_demo_parser`); returns an exit code."""
    load_taichi()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.points < 0 or args.frames < 0:
        raise ValueError("--points and --frames must be >= 0")
    if not args.headless and sys.platform.startswith("linux") and not (
            os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        # GGUI/GLFW exits the process without a display; fail cleanly instead
        raise RuntimeError("no display (DISPLAY is unset): run with --headless --frames N, "
                           "or under Xvfb")
    app = DemoApp(args)
    return app.run()


def main(argv=None) -> int:
    """Entry point of demos/realtime.py (the same options as ``diffus-taichi demo``)."""
    p = argparse.ArgumentParser(prog="realtime.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_demo_options(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_demo(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
