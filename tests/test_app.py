"""Real-time demo (``diffus-taichi demo``): reslice kernel, layout, headless runs on every
backend, and a windowed run under Xvfb driven by XTest key presses."""
import ctypes
import ctypes.util
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from diffus_taichi import backend
from diffus_taichi.pose import Pose, rotvec_to_matrix
from diffus_taichi.probe import get_probe

SMALL = ["--volume", "phantom", "--lines", "64", "--samples", "128", "--points", "500"]
POSE_RE = re.compile(r"pose: (-?[\d.]+(?:,-?[\d.]+){5})\s*$")


def _arch_available(name):
    allowed = os.environ.get("DIFFUS_TEST_ARCHS")
    if allowed and name not in allowed.split(","):
        return False
    return backend.arch_supported(name)


def _png(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def _fan_crop(img, layout):
    f = layout["fan"]
    return img[f["y"]:f["y"] + f["h"], f["x"]:f["x"] + f["w"]]


def _erode(mask, n):
    m = mask.copy()
    for _ in range(n):
        e = m.copy()
        e[1:] &= m[:-1]
        e[:-1] &= m[1:]
        e[:, 1:] &= m[:, :-1]
        e[:, :-1] &= m[:, 1:]
        m = e
    return m


# --------------------------------------------------------------------------------------------
# in-process pieces
# --------------------------------------------------------------------------------------------
def test_reslice_kernel_matches_numpy(arch):
    from diffus_taichi.builtin_volumes import head_phantom
    from diffus_taichi.reslice import Reslicer
    from diffus_taichi.simulator import sample_trilinear_np

    vol = head_phantom(spacing_mm=2.0)
    probe = get_probe("craniotomy", n_lines=32, n_samples=64, image_px=(80, 96))
    pose = vol.default_pose.moved((3.0, -2.0, 4.0), (0.2, -0.1, 0.3))
    rs = Reslicer(vol, probe)
    rs.update(pose)
    got = rs.to_numpy()
    x, z = probe.fan_axes_mm()
    X, Z = np.meshgrid(x, z)
    pts = np.stack([X, np.zeros_like(X), Z], -1)
    ref = sample_trilinear_np(vol.display_channel(), vol.world_to_index(pose.probe_to_world(pts)))
    assert got.shape == (80, 96)
    assert np.abs(got - ref).max() < 1e-4
    assert (ref > 0).mean() > 0.5          # mostly inside the head
    # a pose far outside the volume gives an all-zero reslice
    rs.update(Pose.from_vector([1000, 0, 0, 0, 0, 0]))
    assert np.all(rs.to_numpy() == 0)


def test_layout_static_layer_and_outline():
    from diffus_taichi.app import Layout, static_layer
    from diffus_taichi.reslice import fan_inside_mask, outline_from_mask

    probe = get_probe("craniotomy")
    L = Layout.compute((1280, 720), probe.image_px)
    assert (L.fan.w, L.fan.h) == (512, 512) and L.fan_scale == 1.0     # the fan is shown 1:1
    for a in (L.fan, L.mri, L.view3d):
        assert a.x >= 0 and a.y >= 0 and a.x + a.w <= 1280 and a.y + a.h <= 720
    # panels do not overlap
    assert L.fan.x + L.fan.w < L.mri.x and L.mri.y + L.mri.h < L.view3d.y
    assert L.controls.x >= L.mri.x + L.mri.w
    st = static_layer(L, probe)
    assert st.shape == (1280, 720) and st.dtype == np.uint32
    rgb = (st[..., None] >> np.array([0, 8, 16], np.uint32)) & 0xFF
    ruler = rgb[L.fan.x - 12:L.fan.x - 5, :]             # tick marks left of the fan
    assert (ruler == 200).all(-1).sum() > 20
    inside = fan_inside_mask(probe, (L.mri.h, L.mri.w))
    ol = outline_from_mask(inside, 2)
    assert ol.any() and not (ol & ~inside).any() and ol.sum() < 0.1 * inside.sum()
    # small fans are magnified into the fan box
    L2 = Layout.compute((1280, 720), (128, 128))
    assert L2.fan_scale > 1 and L2.fan.w <= L2.fan_box.w


def test_demo_parser_and_no_display(monkeypatch):
    from diffus_taichi import cli

    args = cli.build_parser().parse_args(["demo", "--headless", "--frames", "5", "--path",
                                          "scripted", "--record", "x"])
    from diffus_taichi.app import run_demo

    assert args.func is run_demo and args.frames == 5 and args.path == "scripted"
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    if sys.platform.startswith("linux"):
        assert cli.main(["demo", "--arch", "cpu"]) == 2           # clean error, no GLFW exit


# --------------------------------------------------------------------------------------------
# headless runs (subprocess: fresh Taichi runtime per backend)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch_name", ["cpu", "vulkan"])
def test_headless_demo_records_frames(tmp_path, arch_name):
    if not _arch_available(arch_name):
        pytest.skip(f"{arch_name} unavailable")
    rec = tmp_path / "rec"
    cmd = [sys.executable, "-m", "diffus_taichi", "demo", "--headless", "--frames", "30",
           "--arch", arch_name, *SMALL, "--record", str(rec), "--path", "scripted"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    m = re.search(r"fps: ([\d.]+) over 29 frames", res.stdout)
    assert m and float(m.group(1)) > 0, res.stdout[-2000:]
    frames = sorted(rec.glob("frame_*.png"))
    assert len(frames) == 30
    layout = json.loads((rec / "layout.json").read_text())
    probe = get_probe("craniotomy", n_lines=64, n_samples=128)
    from diffus_taichi.reslice import fan_inside_mask

    f = layout["fan"]
    inside = fan_inside_mask(probe, (f["h"], f["w"]))
    outside = _erode(~inside, 2)
    crops = []
    for p in (frames[1], frames[15], frames[-1]):
        img = _png(p)
        assert img.shape == (layout["window"][1], layout["window"][0], 3)
        fan = _fan_crop(img, layout).astype(np.float64)
        crops.append(fan)
        lum = fan.mean(-1)
        assert lum[_erode(inside, 2)].mean() > 20, p            # echoes inside the sector
        assert (fan[outside] == 0).all(), p                     # black outside the sector
        mri = img[layout["mri"]["y"]:layout["mri"]["y"] + layout["mri"]["h"],
                  layout["mri"]["x"]:layout["mri"]["x"] + layout["mri"]["w"]]
        assert (np.abs(mri.astype(int) - [255, 176, 0]).sum(-1) == 0).sum() > 100  # outline
    assert np.abs(crops[0] - crops[1]).mean() > 1.0          # the scripted path moves the probe


def test_point_cloud_splat_matches_scene_camera(tmp_path):
    """The splatting kernel projects the cloud exactly like GGUI's scene camera."""
    boxes = {}
    for cloud in ("splat", "scene"):
        shot = tmp_path / f"{cloud}.png"
        cmd = [sys.executable, "-m", "diffus_taichi", "demo", "--headless", "--frames", "3",
               "--arch", "cpu", *SMALL[:-2], "--points", "3000", "--cloud", cloud,
               "--screenshot", str(shot)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        from diffus_taichi.app import Layout

        r = Layout.compute((1280, 720), (512, 512)).view3d
        panel = _png(shot)[r.y:r.y + r.h, r.x:r.x + r.w].astype(int)
        grey = (np.abs(panel[..., 0] - panel[..., 2]) < 40) & (panel.sum(-1) > 250)  # cloud
        ys, xs = np.nonzero(grey)
        assert len(xs) > 500, cloud
        boxes[cloud] = np.array([xs.min(), xs.max(), ys.min(), ys.max()])
    assert np.abs(boxes["splat"] - boxes["scene"]).max() <= 4, boxes


# --------------------------------------------------------------------------------------------
# windowed run under Xvfb, keys injected with XTest
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def x_display():
    if not sys.platform.startswith("linux"):
        pytest.skip("Xvfb test is Linux only")
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("no DISPLAY and no Xvfb")
    num = next((n for n in range(99, 120) if not os.path.exists(f"/tmp/.X11-unix/X{n}")
                and not os.path.exists(f"/tmp/.X{n}-lock")), None)
    if num is None:
        pytest.skip("no free X display number")
    proc = subprocess.Popen([xvfb, f":{num}", "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not os.path.exists(f"/tmp/.X11-unix/X{num}") and time.time() - t0 < 10:
        if proc.poll() is not None:
            pytest.skip("Xvfb could not start")
        time.sleep(0.1)
    if not os.path.exists(f"/tmp/.X11-unix/X{num}"):
        proc.kill()
        pytest.skip("Xvfb did not come up")
    yield f":{num}"
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


class XTest:
    """Minimal XTest client (ctypes): pointer motion and key presses."""

    def __init__(self, display):
        x11 = ctypes.util.find_library("X11") or "libX11.so.6"
        try:
            self.x = ctypes.CDLL(x11)
            self.t = ctypes.CDLL("libXtst.so.6")
        except OSError as e:
            pytest.skip(f"libX11/libXtst unavailable: {e}")
        self.x.XOpenDisplay.restype = ctypes.c_void_p
        self.x.XOpenDisplay.argtypes = [ctypes.c_char_p]
        self.x.XStringToKeysym.restype = ctypes.c_ulong
        self.x.XStringToKeysym.argtypes = [ctypes.c_char_p]
        self.x.XKeysymToKeycode.restype = ctypes.c_ubyte
        self.x.XKeysymToKeycode.argtypes = [ctypes.c_void_p, ctypes.c_ulong]
        self.x.XFlush.argtypes = [ctypes.c_void_p]
        self.x.XCloseDisplay.argtypes = [ctypes.c_void_p]
        self.t.XTestFakeKeyEvent.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_int,
                                             ctypes.c_ulong]
        self.t.XTestFakeMotionEvent.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                                ctypes.c_int, ctypes.c_ulong]
        self.dpy = self.x.XOpenDisplay(display.encode())
        if not self.dpy:
            pytest.skip(f"cannot open X display {display}")

    def move(self, x, y):
        self.t.XTestFakeMotionEvent(self.dpy, -1, x, y, 0)
        self.x.XFlush(self.dpy)

    def key(self, name):
        code = self.x.XKeysymToKeycode(self.dpy, self.x.XStringToKeysym(name.encode()))
        assert code, name
        self.t.XTestFakeKeyEvent(self.dpy, code, 1, 0)
        self.x.XFlush(self.dpy)
        time.sleep(0.08)
        self.t.XTestFakeKeyEvent(self.dpy, code, 0, 0)
        self.x.XFlush(self.dpy)

    def close(self):
        self.x.XCloseDisplay(self.dpy)


class _Lines:
    """Reads a subprocess' merged output in a thread; wait() for a matching line."""

    def __init__(self, proc):
        self.q, self.all = queue.Queue(), []
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, fh):
        for line in fh:
            self.all.append(line)
            self.q.put(line)

    def wait(self, pattern, timeout):
        rx = re.compile(pattern)
        t_end = time.time() + timeout
        while time.time() < t_end:
            try:
                line = self.q.get(timeout=max(0.05, t_end - time.time()))
            except queue.Empty:
                break
            m = rx.search(line)
            if m:
                return m
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s; output:\n"
                             + "".join(self.all[-40:]))


def test_windowed_demo_keys_move_probe(tmp_path, x_display):
    env = dict(os.environ, DISPLAY=x_display, PYTHONUNBUFFERED="1")
    shots = tmp_path / "shots"
    cmd = [sys.executable, "-m", "diffus_taichi", "demo", "--arch", "cpu", *SMALL,
           "--screenshot-dir", str(shots), "--window", "1280x720"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    xt = None
    try:
        out = _Lines(proc)
        pose0 = Pose.parse(out.wait(POSE_RE.pattern, 300).group(1))
        out.wait(r"demo ready", 300)
        xt = XTest(x_display)
        xt.move(300, 300)                 # pointer over the window: it gets the key focus
        time.sleep(0.5)

        def press_and_wait(key, pattern, timeout=60):
            for _ in range(3):            # the first events may race the window mapping
                xt.key(key)
                try:
                    return out.wait(pattern, timeout / 3)
                except AssertionError:
                    continue
            return out.wait(pattern, 1)

        shot1 = press_and_wait("p", r"screenshot: (\S+\.png)").group(1)
        pose1 = Pose.parse(press_and_wait("w", POSE_RE.pattern).group(1))
        # W: +1 mm along the probe's axial axis, no rotation
        step = np.asarray(pose1.translation_mm) - np.asarray(pose0.translation_mm)
        assert np.allclose(step, pose0.rotation[:, 2] * 1.0, atol=2e-4), step
        assert np.allclose(pose1.rotation, pose0.rotation, atol=1e-6)
        pose2 = Pose.parse(press_and_wait("Up", POSE_RE.pattern).group(1))
        # Up: -2 deg about the probe's lateral axis, translation unchanged
        assert np.allclose(pose2.translation_mm, pose1.translation_mm, atol=2e-4)
        assert np.allclose(pose2.rotation, pose1.rotation @ rotvec_to_matrix(
            [np.radians(-2.0), 0, 0]), atol=1e-5)
        time.sleep(0.5)
        shot2 = press_and_wait("p", r"screenshot: (\S+\.png)").group(1)
        pose3 = Pose.parse(press_and_wait("r", POSE_RE.pattern).group(1))
        assert np.allclose(pose3.as_vector(), pose0.as_vector(), atol=1e-4)
        xt.key("Escape")
        assert proc.wait(timeout=60) == 0
    finally:
        if xt is not None:
            xt.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    a, b = _png(shot1), _png(shot2)
    assert a.shape == (720, 1280, 3) and b.shape == a.shape
    from diffus_taichi.app import Layout

    L = Layout.compute((1280, 720), get_probe("craniotomy").image_px).as_dict()
    fa, fb = _fan_crop(a, L).astype(float), _fan_crop(b, L).astype(float)
    assert fa.mean() > 5 and fb.mean() > 5
    assert np.abs(fa - fb).mean() > 2.0                     # the fan image changed


# --------------------------------------------------------------------------------------------
# the app object in-process (headless window): keys, live settings, rebuilds
# --------------------------------------------------------------------------------------------
def test_demo_app_keys_settings_and_rebuild(cpu32, capsys):
    from diffus_taichi import cli
    from diffus_taichi.app import DemoApp

    args = cli.build_parser().parse_args(
        ["demo", "--headless", "--frames", "3", "--arch", "cpu", "--volume", "uniform",
         "--lines", "32", "--samples", "96", "--image-px", "128", "--points", "300"])
    app = DemoApp(args)
    try:
        p0 = app.pose
        for key, d_mm, d_rot in (("w", (0, 0, 1), (0, 0, 0)), ("a", (-1, 0, 0), (0, 0, 0)),
                                 ("E", (0, 1, 0), (0, 0, 0)), ("Right", (0, 0, 0), (0, 2, 0)),
                                 ("z", (0, 0, 0), (0, 0, 2))):
            before = app.pose
            assert app.handle_key(key)
            assert app.pose == before.moved(d_mm, np.radians(d_rot)), key
        assert app.handle_key("r") and app.pose == p0
        assert app.handle_key(" ") and app.frozen
        assert app.handle_key(" ") and not app.frozen
        assert not app.handle_key("Escape")
        # live settings: gain is read by every forward()
        app.simulate()
        dark = app.sim.fan.to_numpy().mean()
        app.sim.settings.gain_db += 20.0
        app.simulate()
        assert app.sim.fan.to_numpy().mean() > dark + 0.05
        # geometry / echo model changes rebuild the simulator (once)
        sim0 = app.sim
        app._request({"n_lines": 48, "depth_mm": 40.0}, "layered", "auto")
        app.maybe_rebuild()
        assert app.sim is not sim0 and app.sim.probe.n_lines == 48
        assert app.sim.echo_model == "layered" and app.sim.probe.depth_mm == 40.0
        assert app.sim.settings.gain_db == 32.0                # live settings carried over
        sim1 = app.sim
        app.maybe_rebuild()
        assert app.sim is sim1                                  # unchanged: no rebuild
        assert app.run() == 0
    finally:
        app.close()
    assert re.search(r"fps: [\d.]+ over 2 frames", capsys.readouterr().out)
