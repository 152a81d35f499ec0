"""Built-in volumes, chosen by name wherever a volume path is accepted.

* ``brain`` (default): MNI ICBM152 2009a symmetric T1 template with grey/white matter, CSF,
  bone and scalp fractions (``assets/brain_mni152_2009a.npz``; licence in assets/).
* ``phantom``: analytic head phantom (ellipsoids: scalp, skull with a craniotomy window, CSF,
  grey and white matter, ventricles, a tumour, a vessel) with known tissue labels;
  ``phantom-noskull`` without scalp and skull.
* ``uniform``: a homogeneous block of scattering brain tissue in water.

Adding one is a few lines::

    @register_builtin("wire")
    def _wire():
        return head_phantom(...)          # or any function returning a Volume
"""
from __future__ import annotations

import logging
import math
import os

import numpy as np

from .acoustics import ASSETS
from .pose import Pose
from .volume import (CHUNK_VOXELS, INTENSITY, U8Channels, Volume, _check_affine,
                     register_builtin, voxel_to_world)

log = logging.getLogger(__name__)

BRAIN_NPZ = os.path.join(ASSETS, "brain_mni152_2009a.npz")


def surface_pose(vol: Volume, direction, lateral_hint, content=None, standoff_mm=1.0,
                 threshold=0.5) -> Pose:
    """Probe on the outer surface of ``content`` (default: sum of tissue channels), reached from
    the content's centre along world ``direction``, looking back inwards (towards the centre)."""
    if content is None:
        tissue = [i for i, n in enumerate(vol.channel_names) if n != INTENSITY]

        def region(sl):
            return vol.channels[sl][..., tissue].sum(-1)
    else:
        content = np.asarray(content)

        def region(sl):
            return content[sl]
    return _surface_pose(vol.affine, vol.shape, region, direction, lateral_hint, standoff_mm,
                         threshold, vol.name)


def _surface_pose(affine, shape, region, direction, lateral_hint, standoff_mm, threshold,
                  name) -> Pose:
    """:func:`surface_pose` on a content given as ``region(slices) -> array`` (the content on
    that box of voxels), so that it never needs to exist as a whole: the centre of the voxels
    above ``threshold`` comes from per-slab index sums (== np.argwhere(...).mean(0), exactly:
    integer sums), then a march along ``direction`` finds the last voxel inside."""
    X, Y, Z = (int(v) for v in shape)
    per = max(1, CHUNK_VOXELS // (Y * Z))
    n, s = 0, np.zeros(3, dtype=np.int64)
    for a in range(0, X, per):
        b = min(X, a + per)
        m = region((slice(a, b),)) > threshold
        cnt = int(np.count_nonzero(m))
        if cnt:
            n += cnt
            s[0] += int(np.dot(np.arange(a, b, dtype=np.int64), m.sum(axis=(1, 2), dtype=np.int64)))
            s[1] += int(np.dot(np.arange(Y, dtype=np.int64), m.sum(axis=(0, 2), dtype=np.int64)))
            s[2] += int(np.dot(np.arange(Z, dtype=np.int64), m.sum(axis=(0, 1), dtype=np.int64)))
    if n == 0:
        raise ValueError(f"volume {name!r}: no content to put a probe on")
    centre = voxel_to_world(affine, s.astype(np.float64) / n)
    u = np.asarray(direction, dtype=np.float64)
    u /= np.linalg.norm(u)
    step = 0.25 * float(np.linalg.norm(affine[:3, :3], axis=0).min())
    w2v = np.linalg.inv(affine)
    hi = np.array(shape)
    last_inside = 0.0
    for k in range(1, int(2000 / step)):
        p = centre + k * step * u
        ijk = np.rint(voxel_to_world(w2v, p)).astype(int)
        if np.any(ijk < 0) or np.any(ijk >= hi):
            break
        if region(tuple(slice(i, i + 1) for i in ijk)).reshape(-1)[0] > threshold:
            last_inside = k * step
    origin = centre + (last_inside + standoff_mm) * u
    return Pose.look_at(origin, -u, lateral_hint)


# --------------------------------------------------------------------------------------------
# the built-in brain: built from the asset (uint8 channels), cached on disk after the first
# build (the finished uint8 channels, craniotomy included, and the default pose)
# --------------------------------------------------------------------------------------------
BRAIN_CACHE_VERSION = "1"       # bump when the brain's construction changes in another file
CACHE_ENV = "DIFFUS_TAICHI_CACHE_DIR"
BRAIN_CACHE_KEEP = 2            # entries kept (44 MB each): two checkouts may share the cache


def cache_dir() -> str | None:
    """Directory of diffus-taichi's on-disk cache: ``$DIFFUS_TAICHI_CACHE_DIR`` (empty, ``0``
    or ``off``: no cache), else ``$XDG_CACHE_HOME/diffus_taichi`` (``~/.cache/diffus_taichi``)."""
    d = os.environ.get(CACHE_ENV)
    if d is not None:
        return None if d.strip().lower() in ("", "0", "off", "none", "false") else d
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "diffus_taichi")


def _brain_cache_key() -> str:
    """Hash of everything the cached brain depends on: the asset (size and member CRCs), the
    source of the modules that build it, numpy's version and BRAIN_CACHE_VERSION."""
    import hashlib
    import zipfile

    from . import pose, volume

    h = hashlib.sha256(f"{BRAIN_CACHE_VERSION}|{np.__version__}|{CRANIOTOMY_RADIUS_MM}".encode())
    h.update(str(os.path.getsize(BRAIN_NPZ)).encode())
    with zipfile.ZipFile(BRAIN_NPZ) as zf:
        for info in zf.infolist():
            h.update(f"|{info.filename}:{info.CRC}:{info.file_size}".encode())
    for mod in (__file__, volume.__file__, pose.__file__):
        with open(mod, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:24]


def _brain_u8() -> tuple[np.ndarray, np.ndarray, list, Pose]:
    """Build the brain from the asset: uint8 channels (X, Y, Z, 1 + tissues) [t1, tissues...]
    (float value = uint8 / 255), the affine, the tissue names and the default pose; the
    craniotomy is cut into the uint8 channels."""
    with np.load(BRAIN_NPZ) as z:
        names = [str(n) for n in z["channel_names"]]
        affine = z["affine"].astype(np.float64)
        t1 = z["t1"]
        u8 = np.empty(t1.shape + (1 + len(names),), dtype=np.uint8)
        u8[..., 0] = t1
        del t1
        for c, n in enumerate(names, 1):
            u8[..., c] = z[n]
    A = _check_affine(affine, "brain")
    inv255 = np.float32(255.0)
    mask_ch = [1 + names.index(n) for n in ("grey_matter", "white_matter") if n in names]

    def brain_mask(sl):   # == sum(vol.channel(n) for n in (grey, white)) of the float volume
        out = 0
        for c in mask_ch:
            out = out + np.divide(u8[sl + (slice(None),) * (3 - len(sl)) + (c,)], inv255,
                                  dtype=np.float32)
        return out

    pose = _surface_pose(A, u8.shape[:3], brain_mask, direction=(0.55, -0.05, 0.83),
                         lateral_hint=(0, 0, 1), standoff_mm=0.5, threshold=0.3, name="brain")
    names_all = (INTENSITY, *names)
    cut = [i for i, n in enumerate(names_all) if n in ("cortical_bone", "scalp")]
    if cut:
        sl, inside = _craniotomy_region(A, u8.shape[:3], pose.translation_mm, CRANIOTOMY_RADIUS_MM)
        for i in cut:
            u8[sl + (i,)][inside] = 0
    return u8, affine, names, pose


def _brain_from_cache(d: str, key: str):
    import json

    stem = os.path.join(d, f"brain-{key}")
    with open(stem + ".json") as fh:
        meta = json.load(fh)
    u8 = np.load(stem + ".npy", mmap_mode="r")
    if (u8.dtype != np.uint8 or list(u8.shape) != meta["shape"]
            or len(meta["names"]) + 1 != u8.shape[3]):
        raise ValueError("cache entry does not match its metadata")
    return (u8, np.array(meta["affine"], dtype=np.float64), [str(n) for n in meta["names"]],
            Pose.from_vector(meta["pose"]))


def _brain_to_cache(d: str, key: str, u8, affine, names, pose) -> None:
    """Write the cache entry atomically (temporary files, then rename; .npy last, so a reader
    that finds the .npy also finds its .json); any failure only logs."""
    import json
    import tempfile

    stem = os.path.join(d, f"brain-{key}")
    tmp = []
    try:
        os.makedirs(d, exist_ok=True)
        meta = {"version": BRAIN_CACHE_VERSION, "shape": list(u8.shape), "names": list(names),
                "affine": np.asarray(affine, dtype=np.float64).tolist(),
                "pose": [float(v) for v in pose.as_vector()]}
        for ext, write in ((".json", lambda fh: fh.write(json.dumps(meta).encode())),
                           (".npy", lambda fh: np.save(fh, np.ascontiguousarray(u8)))):
            fd, t = tempfile.mkstemp(prefix=".brain-", suffix=ext + ".tmp", dir=d)
            tmp.append(t)
            with os.fdopen(fd, "wb") as fh:
                write(fh)
            os.replace(t, stem + ext)
            tmp.remove(t)
        _prune_brain_cache(d, keep=BRAIN_CACHE_KEEP)
    except Exception as e:  # noqa: BLE001 - a cache must never break loading
        log.debug("brain cache not written to %s: %s: %s", d, type(e).__name__, e)
        for t in tmp:
            try:
                os.remove(t)
            except OSError:
                pass


def _prune_brain_cache(d: str, keep: int) -> None:
    """Keep the ``keep`` most recently written brain entries (other code versions, e.g. a second
    checkout, may share the directory); remove the older ones."""
    entries = {}
    for f in os.listdir(d):
        if f.startswith("brain-") and f.endswith(".npy"):
            try:
                entries[f[:-4]] = os.path.getmtime(os.path.join(d, f))
            except OSError:
                pass
    for stem in sorted(entries, key=entries.get, reverse=True)[keep:]:
        for ext in (".npy", ".json"):
            try:
                os.remove(os.path.join(d, stem + ext))
            except OSError:
                pass


@register_builtin("brain")
def brain() -> Volume:
    """MNI ICBM152 2009a T1 + tissue fractions; default pose: right fronto-parietal craniotomy,
    probe on the cortex looking inwards, coronal-ish image plane.

    The finished channels (uint8, craniotomy cut) and the default pose are cached in
    :func:`cache_dir` (keyed by the asset, the building code and BRAIN_CACHE_VERSION), so later
    processes skip the decompression and the pose search; without a usable cache directory the
    brain is built from the asset every time (same result)."""
    if not os.path.exists(BRAIN_NPZ):
        raise FileNotFoundError(f"built-in brain asset missing: {BRAIN_NPZ!r} "
                                "(regenerate with `python assets/make_brain_asset.py`)")
    d = cache_dir()
    key = got = None
    if d is not None:
        try:
            key = _brain_cache_key()
            got = _brain_from_cache(d, key)
        except Exception as e:  # noqa: BLE001 - missing or unreadable entry: build it
            log.debug("brain cache miss in %s: %s: %s", d, type(e).__name__, e)
    if got is None:
        got = _brain_u8()
        if key is not None:
            _brain_to_cache(d, key, *got)
    u8, affine, names, pose = got
    # float32 channels u8 / 255, made only when read (the property kernels read the uint8)
    return Volume(U8Channels(u8), affine, (INTENSITY, *names), name="brain", default_pose=pose,
                  meta={"source": "MNI ICBM152 2009a symmetric (see assets/LICENSE_MNI152.txt)"})


CRANIOTOMY_RADIUS_MM = 30.0


def _craniotomy_region(affine, shape, centre_mm, radius_mm: float):
    """Box of voxels (tuple of slices) around ``centre_mm`` and the mask (box shape) of the
    voxels within ``radius_mm`` of it."""
    A = _check_affine(affine, "volume")
    c = voxel_to_world(np.linalg.inv(A), np.asarray(centre_mm, dtype=np.float64))
    r_vox = radius_mm / np.linalg.norm(A[:3, :3], axis=0)
    lo = np.maximum(np.floor(c - r_vox).astype(int), 0)
    hi = np.minimum(np.ceil(c + r_vox).astype(int) + 1, np.array(shape))
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    ijk = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
    inside = np.linalg.norm(voxel_to_world(A, ijk) - np.asarray(centre_mm), axis=-1) < radius_mm
    return sl, inside


def cut_craniotomy(vol: Volume, centre_mm, radius_mm: float) -> None:
    """Replace bone and scalp within ``radius_mm`` of ``centre_mm`` by coupling saline (in place)."""
    idx = [i for i, n in enumerate(vol.channel_names) if n in ("cortical_bone", "scalp")]
    if not idx:
        return
    sl, inside = _craniotomy_region(vol.affine, vol.shape, centre_mm, radius_mm)
    for i in idx:
        vol.channels[sl + (i,)][inside] = 0.0


# --------------------------------------------------------------------------------------------
PHANTOM_TISSUES = ("scalp", "cortical_bone", "csf", "grey_matter", "white_matter", "tumour", "blood")
PHANTOM_T1 = {"water": 0.05, "scalp": 0.85, "cortical_bone": 0.08, "csf": 0.15, "grey_matter": 0.55,
              "white_matter": 0.8, "tumour": 0.45, "blood": 0.65}


def _ellipsoid_occupancy(X, Y, Z, centre, radii, h):
    """Soft (partial-volume) occupancy 0..1 of an ellipsoid on a grid of spacing h (mm)."""
    dx, dy, dz = X - centre[0], Y - centre[1], Z - centre[2]
    q = np.sqrt((dx / radii[0]) ** 2 + (dy / radii[1]) ** 2 + (dz / radii[2]) ** 2) + 1e-9
    dist = np.sqrt(dx * dx + dy * dy + dz * dz) * (1.0 - 1.0 / q)   # approx. signed distance
    return np.clip(0.5 - dist / h, 0.0, 1.0)


def head_phantom(spacing_mm: float = 1.0, skull: bool = True, craniotomy_radius_mm: float = 25.0,
                 tumour: bool = True, vessel: bool = True) -> Volume:
    """Analytic head phantom centred on the world origin (x right, y anterior, z superior).

    Tissue-fraction channels (PHANTOM_TISSUES) plus a synthetic T1-like intensity; ``labels``
    holds the dominant tissue per voxel (0 = water). With ``skull``, scalp and bone have a
    circular craniotomy window of the given radius at the vertex (+z)."""
    h = float(spacing_mm)
    ext = np.array([80.0, 100.0, 85.0])
    axes = [np.arange(-e, e + h / 2, h) for e in ext]
    X, Y, Z = np.meshgrid(*axes, indexing="ij")
    frac = np.zeros(X.shape + (len(PHANTOM_TISSUES),), dtype=np.float32)
    T = {n: i for i, n in enumerate(PHANTOM_TISSUES)}

    def paint(tissue, occ):
        nonlocal frac
        occ = occ.astype(np.float32)[..., None]
        frac *= (1.0 - occ)
        frac[..., T[tissue]] += occ[..., 0]

    head = np.array([72.0, 92.0, 78.0])
    window = np.hypot(X, Y) < craniotomy_radius_mm
    if skull:
        paint("scalp", _ellipsoid_occupancy(X, Y, Z, (0, 0, 0), head, h) * ~(window & (Z > 0)))
        paint("cortical_bone", _ellipsoid_occupancy(X, Y, Z, (0, 0, 0), head - 5, h) * ~(window & (Z > 0)))
        # inside the skull: remove bone/scalp fractions (painted as CSF below)
    paint("csf", _ellipsoid_occupancy(X, Y, Z, (0, 0, 0), head - 11, h))
    paint("grey_matter", _ellipsoid_occupancy(X, Y, Z, (0, 0, 0), head - 13, h))
    paint("white_matter", _ellipsoid_occupancy(X, Y, Z, (0, 0, 0), head - 19, h))
    for sx in (-1, 1):   # lateral ventricles
        paint("csf", _ellipsoid_occupancy(X, Y, Z, (sx * 9.0, 5.0, 12.0), (6.0, 25.0, 9.0), h))
    if tumour:
        paint("tumour", _ellipsoid_occupancy(X, Y, Z, (22.0, 10.0, 32.0), (9.0, 9.0, 9.0), h))
    if vessel:   # a vessel running anterior-posterior
        r = np.hypot(X + 18.0, Z - 38.0)
        paint("blood", np.clip(0.5 - (r - 2.0) / h, 0, 1) * (np.abs(Y) < 60))
    t1 = np.full(X.shape, PHANTOM_T1["water"], dtype=np.float32)
    t1 = t1 * (1 - frac.sum(-1)) + sum(frac[..., T[n]] * PHANTOM_T1[n] for n in PHANTOM_TISSUES)
    labels = np.where(frac.max(-1) > 1 - frac.sum(-1), frac.argmax(-1) + 1, 0).astype(np.int16)
    affine = np.diag([h, h, h, 1.0])
    affine[:3, 3] = [a[0] for a in axes]
    data = np.concatenate([t1[..., None], frac], axis=-1)
    vol = Volume(data, affine, (INTENSITY, *PHANTOM_TISSUES), name="phantom",
                 default_pose=Pose.from_vector(np.zeros(6)), labels=labels,
                 label_names=("water", *PHANTOM_TISSUES))
    top = head[2] - 13 + 0.5
    vol.default_pose = Pose.look_at((0.0, 0.0, top), (0, 0, -1), (1, 0, 0))
    return vol


@register_builtin("phantom")
def _phantom() -> Volume:
    return head_phantom()


@register_builtin("phantom-noskull")
def _phantom_noskull() -> Volume:
    return head_phantom(skull=False)


@register_builtin("uniform")
def uniform_block(size_mm=(60.0, 20.0, 80.0), spacing_mm=1.0, tissue="white_matter") -> Volume:
    """A homogeneous block of one tissue (default white matter) in water; probe at its top."""
    shape = tuple(int(round(s / spacing_mm)) + 1 for s in size_mm)
    frac = np.ones(shape + (1,), dtype=np.float32)
    affine = np.diag([spacing_mm] * 3 + [1.0])
    affine[:3, 3] = -np.asarray(size_mm) / 2
    vol = Volume(frac, affine, (tissue,), name="uniform", default_pose=Pose.from_vector(np.zeros(6)))
    vol.default_pose = Pose.look_at((0.0, 0.0, size_mm[2] / 2), (0, 0, -1), (1, 0, 0))
    return vol


# --------------------------------------------------------------------------------------------
# test objects (physics validation, benchmarks/validate_physics.py)
def _grid(extent_mm, spacing_mm):
    """Axes (x, y, z) in mm centred on 0 (x, y) and from 0 down to -depth (z), and the affine."""
    axes = [np.arange(-extent_mm[0] / 2, extent_mm[0] / 2 + 1e-9, spacing_mm[0]),
            np.arange(-extent_mm[1] / 2, extent_mm[1] / 2 + 1e-9, spacing_mm[1]),
            np.arange(-extent_mm[2], 1e-9, spacing_mm[2])]
    affine = np.diag(list(spacing_mm) + [1.0])
    affine[:3, 3] = [a[0] for a in axes]
    return axes, affine


TOP_POSE = Pose.look_at((0.0, 0.0, 0.0), (0, 0, -1), (1, 0, 0))   # probe face at z = 0, imaging -z

WIRE_X_MM = (-2.5, 0.0, 2.5)
WIRE_VOXEL_Z_MM = 0.01
WIRE_PROBE_STEP_MM = 40.0 / 1023      # sample spacing of the validation probe (40 mm, 1024 samples)


def _wire_depths(targets=(10.0, 20.0, 30.0), step=WIRE_PROBE_STEP_MM, vz=WIRE_VOXEL_Z_MM):
    """Front-face depths near ``targets`` (multiples of the voxel vz) such that a sample of the
    validation probe lies inside the face's 1-voxel ramp, >= 90 % of the way down it: the step
    then falls (>= 90 %) on one sample interval and both ends of that interval see the face's
    normal (the incidence weight of echo.primary_combine is evaluated at samples)."""
    out = []
    for t in targets:
        for k in sorted(range(int(t / step) - 30, int(t / step) + 30), key=lambda k: abs(k * step - t)):
            D = math.ceil(k * step / vz - 1e-9) * vz
            if (k * step - (D - vz)) / vz >= 0.9:
                out.append(round(D, 6))
                break
    return tuple(out)


WIRE_DEPTHS_MM = _wire_depths()


@register_builtin("wires")
def wire_phantom(depths_mm=WIRE_DEPTHS_MM, x_mm=WIRE_X_MM, thickness_mm=1.0) -> Volume:
    """Nylon wires along the elevation axis (y) in water, as in commercial wire phantoms: one per
    depth in ``depths_mm`` at lateral positions ``x_mm`` (multiples of 0.25 mm: they lie on scan
    lines of the validation probe). Each wire is 3 x voxels (0.15 mm) wide, narrower than the
    0.25 mm line spacing (flat across the line through it, so its face is seen at normal
    incidence), and ``thickness_mm`` deep, so its front face is a sharp step (z voxel 0.01 mm) whose echo is the point-spread
    function; the back-face echo arrives ``thickness_mm`` later. Probe face at z = 0."""
    axes, affine = _grid((12.0, 2.0, 38.0), (0.05, 1.0, WIRE_VOXEL_Z_MM))
    X, Z = np.meshgrid(axes[0], axes[2], indexing="ij")
    frac = np.zeros((len(axes[0]), len(axes[2])), dtype=np.float32)
    for d, x in zip(depths_mm, x_mm):
        frac[(np.abs(X - x) < 0.075) & (-Z >= d - 1e-6) & (-Z < d + thickness_mm)] = 1.0
    data = np.repeat(frac[:, None, :, None], len(axes[1]), axis=1)
    return Volume(data, affine, ("nylon",), name="wires", default_pose=TOP_POSE)


CYSTS = (  # (tissue, x mm, depth mm, radius mm): anechoic, hypoechoic, hyperechoic
    ("csf", -12.0, 12.0, 3.0), ("grey_matter", -4.0, 20.0, 3.0), ("tumour", 4.0, 28.0, 3.0),
    ("csf", 12.0, 16.0, 2.0))


@register_builtin("cysts")
def cyst_phantom(background="white_matter", cysts=CYSTS) -> Volume:
    """A block of scattering ``background`` tissue (40 x 10 x 50 mm) with spherical inclusions
    of other tissues (``CYSTS``: anechoic CSF, hypoechoic grey matter, hyperechoic tumour) at
    several depths; contrast = ratio of the tissues' scattering. Probe face at z = 0."""
    axes, affine = _grid((40.0, 10.0, 50.0), (0.25, 0.25, 0.25))
    X, Y, Z = np.meshgrid(*axes, indexing="ij")
    names = [background] + sorted({c[0] for c in cysts})
    frac = np.zeros(X.shape + (len(names),), dtype=np.float32)
    frac[..., 0] = 1.0
    for t, x, d, rad in cysts:
        occ = np.clip(0.5 - (np.sqrt((X - x) ** 2 + Y ** 2 + (Z + d) ** 2) - rad) / 0.25, 0, 1)
        frac *= (1.0 - occ)[..., None]
        frac[..., names.index(t)] += occ
    return Volume(frac, affine, tuple(names), name="cysts", default_pose=TOP_POSE)


LAYERS = (("water", 0.0), ("fat", 10.0), ("white_matter", 20.0))   # (tissue, top depth mm)


@register_builtin("layers")
def layer_phantom(layers=LAYERS, depth_mm=40.0) -> Volume:
    """Planar layers perpendicular to the beam: each (tissue, top depth mm) fills down to the
    next; impedances and attenuations come from the tissue table (or mapping overrides). z voxel
    0.01 mm, so each interface is a sharp step. Probe face at z = 0."""
    axes, affine = _grid((20.0, 4.0, depth_mm), (1.0, 1.0, 0.01))
    depth = -axes[2]
    names = [t for t, _ in layers if t != "water"]
    frac = np.zeros((len(depth), max(len(names), 1)), dtype=np.float32)
    for i, (t, top) in enumerate(layers):
        bottom = layers[i + 1][1] if i + 1 < len(layers) else np.inf
        if t != "water":
            frac[(depth >= top) & (depth < bottom), names.index(t)] = 1.0
    data = np.broadcast_to(frac, (len(axes[0]), len(axes[1])) + frac.shape).copy()
    return Volume(data, affine, tuple(names), name="layers", default_pose=TOP_POSE)
