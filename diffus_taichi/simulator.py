"""Renderer facade: volume -> acoustic properties -> rays (pose) -> march -> echo -> image
formation -> scan conversion, with every stage held in preallocated Taichi fields.

    sim = Simulator("brain", probe="craniotomy")
    fan = sim.render()                  # (H, W) float32 in [0, 1], default pose
    fan = sim.render(Pose.parse("10,0,5,0,0,0"))
    st = sim.stages()                   # dict of every intermediate stage as numpy
    sims = Simulator("brain", batch=16)  # 16 poses per launch
    fans = sims.render_batch(poses)     # (16, H, W)

Rendering without a gradient runs the fused forward kernels (:mod:`diffus_taichi.fused`);
under ``ti.ad.Tape`` (value_and_grad, vjp) the primary model runs the fused kernels with
hand-written adjoints of :mod:`diffus_taichi.tape_fused`, the other models the staged kernels,
one field per stage.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import taichi as ti

from . import backend, echo, fused, image, march, property_volume, rays, scan
from .acoustics import AcousticMapping, get_mapping
from .fieldio import Uploader, clear_all_gradients
from .launch import fast_call
from .pose import Pose
from .probe import Probe, get_probe
from .volume import Volume, load_volume

log = logging.getLogger(__name__)

ECHO_MODELS = ("primary", "layered", "reverb")


@dataclass
class ImagingSettings:
    """Display chain. gain_db: added to 20 log10(envelope); dynamic_range_db: dB mapped to [0, 1];
    tgc_db_per_cm: time-gain compensation slope (None: 1.2 dB/cm per MHz, the round trip of
    0.6 dB/cm/MHz average soft tissue); noise_cell_mm: cell of the tissue-fixed scatterer
    lattice (one hashed point scatterer per cell); speckle: True/'coherent' (tissue-fixed
    scatterers summed coherently with the pulse), 'mean' (their expected intensity:
    speckle-free, smooth in the pose; for coarse registration levels) or False/'off'; seed:
    scatterer realisation; elevation_planes: 1 or 3 elevation planes integrated for the
    scatterers (slice thickness, :meth:`Probe.elevation_fwhm_mm`)."""

    gain_db: float = 12.0
    dynamic_range_db: float = 50.0
    tgc_db_per_cm: float | None = None
    speckle: "bool | str" = True
    noise_cell_mm: float = 0.08
    seed: int = 1
    elevation_planes: int = 1

    def validate(self):
        for k in ("gain_db", "dynamic_range_db", "noise_cell_mm"):
            v = getattr(self, k)
            if not np.isfinite(v):
                raise ValueError(f"{k} must be finite, got {v!r}")
        if self.tgc_db_per_cm is not None and not np.isfinite(self.tgc_db_per_cm):
            raise ValueError(f"tgc_db_per_cm must be finite, got {self.tgc_db_per_cm!r}")
        if self.speckle not in (True, False, "coherent", "mean", "off"):
            raise ValueError(f"speckle must be True/'coherent', 'mean' or False/'off', got {self.speckle!r}")
        if self.dynamic_range_db <= 0:
            raise ValueError(f"dynamic_range_db must be > 0 dB, got {self.dynamic_range_db}")
        if self.noise_cell_mm <= 0:
            raise ValueError(f"noise_cell_mm must be > 0 mm, got {self.noise_cell_mm}")
        if self.elevation_planes not in (1, 3):
            raise ValueError(f"elevation_planes must be 1 or 3, got {self.elevation_planes!r}")


@contextlib.contextmanager
def _off_tape():
    """Kernels launched inside are not recorded by a running ``ti.ad.Tape`` (set-up uploads
    that happen lazily, on first use inside a Tape: not part of the differentiated program)."""
    rt = ti.lang.impl.get_runtime()
    tape, rt.target_tape = rt.target_tape, None
    try:
        yield
    finally:
        rt.target_tape = tape


class Simulator:
    """B-mode ultrasound simulator for one volume and probe.

    Args:
        volume: built-in name (``brain``, ``phantom``, ...), NIfTI path or :class:`Volume`.
        probe: preset name (``craniotomy``, ``phased``, ``convex``, ``linear``) or :class:`Probe`.
        mapping: ``auto`` | ``tissue`` | ``transfer`` | JSON file | :class:`AcousticMapping`.
        echo_model: ``primary`` (default) | ``layered`` | ``reverb``.
        arch: ``auto`` | ``cuda`` | ``vulkan`` | ``cpu`` (default ``$DIFFUS_ARCH`` or auto).
        precision: ``f32`` | ``f64`` (f64: CPU/CUDA only).
        requires_grad: allocate gradient fields for ``ti.ad.Tape``: ``"pose"`` (pose only,
            fastest), ``True`` (pose and acoustic mapping parameters) or ``False``.
        share_volume_with: another Simulator on the same volume whose volume, mapping and
            acoustic-property fields are reused (e.g. several probe resolutions, no extra memory).
        batch: frames rendered per launch (B poses at once, :meth:`render_batch`); every per-ray
            field then holds B x n_lines rays and the fan is (B, H, W). Gradients need batch=1.
        storage: how the acoustic-property volume is held (:mod:`diffus_taichi.property_volume`):
            ``"full"`` (a Taichi field of all channels, ``self.vol``, plus ``self.props`` at the
            Simulator's precision: needed for mapping gradients), ``"lean"`` (``props`` at the
            Simulator's precision computed from the NumPy channels slab by slab, no channel
            field; same values as full), ``"compact"`` (as lean with ``props`` stored as float16:
            6 bytes per voxel instead of 12; renders agree with f32 storage to about 1e-3 of the
            [0, 1] image scale, see tests/test_startup_memory.py) or ``"auto"`` (default: full
            with ``requires_grad=True`` or f64, else compact from 256^3 voxels up, else lean).
            The choice is logged and kept in ``self.storage``.
        **settings: fields of :class:`ImagingSettings`.
    """

    # primary model under ti.ad.Tape: fused kernels with hand-written adjoints (tape_fused);
    # False (set before construction): the staged kernels, one gradient field per stage
    tape_fused = True

    def __init__(self, volume="brain", probe="craniotomy", mapping="auto", echo_model="primary",
                 arch=None, precision="f32", requires_grad=False, share_volume_with=None,
                 batch=1, storage="auto", **settings):
        t0 = time.perf_counter()
        if requires_grad not in (False, True, "pose"):
            raise ValueError(f"requires_grad must be False, True or 'pose', got {requires_grad!r}")
        if echo_model not in ECHO_MODELS:
            raise ValueError(f"echo_model must be one of {', '.join(ECHO_MODELS)}, got {echo_model!r}")
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or not 1 <= batch <= 4096:
            raise ValueError(f"batch must be an integer in 1..4096 (frames per launch), got {batch!r}")
        if batch > 1 and requires_grad:
            raise ValueError("batch > 1 renders only (no gradients); use batch=1 with requires_grad")
        self.batch = int(batch)
        self._shared = share_volume_with
        if share_volume_with is not None:
            other = share_volume_with
            if other.precision != precision or (requires_grad is True and other.requires_grad is not True):
                raise ValueError("share_volume_with: precision must match, and mapping gradients "
                                 "(requires_grad=True) need a Simulator built with them")
            volume, mapping = other.volume, other.mapping
        self.volume: Volume = load_volume(volume)
        self.probe: Probe = probe if isinstance(probe, Probe) else get_probe(probe)
        self.mapping: AcousticMapping = get_mapping(mapping, self.volume)
        self.echo_model = echo_model
        self.settings = ImagingSettings(**settings)
        self.settings.validate()
        self.arch = backend.ensure(arch, precision)
        self.precision = precision
        self.real = ti.f64 if precision == "f64" else ti.f32
        self.requires_grad = requires_grad
        self._np_real = np.float64 if precision == "f64" else np.float32
        if share_volume_with is not None:
            self.storage = share_volume_with.storage
            self.props_origin = share_volume_with.props_origin
            self._props_shape = tuple(share_volume_with.props.shape)
        else:
            self.storage = property_volume.resolve_storage(
                storage, precision, requires_grad, int(np.prod(self.volume.shape)))
            self.props_origin, self._props_shape = (0, 0, 0), tuple(self.volume.shape)
            box = (property_volume.content_box(self.volume, self.mapping)
                   if self.storage == "compact" else None)
            if box is not None:                   # compact: props over the content box only
                self.props_origin = box[0]
                self._props_shape = tuple(int(h - l) for l, h in zip(*box))
        self.props_cropped = self._props_shape != tuple(self.volume.shape)
        self._alloc()
        self._upload_static()
        self.last_pose = self.volume.default_pose
        log.info("simulator ready: volume %s %s, probe %s %dx%d, %s, arch %s, storage %s "
                 "(%s properties%s%s, %.0f MiB%s) (%.2f s)",
                 self.volume.name, self.volume.shape, self.probe.name, self.probe.n_lines,
                 self.probe.n_samples, echo_model, self.arch, self.storage,
                 "f16" if self.storage == "compact" else precision,
                 ", channel field" if self.storage == "full" else ", no channel field",
                 f", content box {self._props_shape} at {self.props_origin}"
                 if self.props_cropped else "",
                 int(np.prod(self._props_shape)) * property_volume.bytes_per_voxel(
                     self.storage, self.volume.n_channels, precision) / 2 ** 20,
                 ", shared" if share_volume_with is not None else "",
                 time.perf_counter() - t0)

    # --- allocation ---------------------------------------------------------------------------
    def _alloc(self):
        real, g = self.real, bool(self.requires_grad)
        gm = self.requires_grad is True          # gradients w.r.t. the mapping too
        v, p = self.volume, self.probe
        NR, NS = p.n_lines * self.batch, p.n_samples      # rays of all B frames, stacked
        H, W = p.image_px
        # pose (B, 6) [t mm, rotvec rad] and scatterer realisation (B,) per frame: fields behind
        # the properties pose / seeds, and their latest values in NumPy (set_poses)
        self._pose_field = ti.field(real, shape=(self.batch, 6), needs_grad=g)
        self._seeds_field = ti.field(ti.i32, shape=self.batch)
        self._pose_host = np.zeros((self.batch, 6), self._np_real)    # the fields' zeros
        self._seeds_host = np.zeros(self.batch, np.int32)
        self._pose_stale = False
        self.line_o = ti.Vector.field(3, real, shape=p.n_lines)
        self.line_d = ti.Vector.field(3, real, shape=p.n_lines)
        self.ro, self.rd, self.vo, self.vd = (ti.Vector.field(3, real, shape=NR, needs_grad=g)
                                              for _ in range(4))
        rows, chan, self.table_names = self.mapping.table_arrays(v)
        self.tf_chan = v.intensity_index if self.mapping.kind == "transfer" else -1
        shared = ("vol", "w2v", "gradT", "table", "chan_tissue", "tf", "mlp_w", "props", "outside")
        if self._shared is not None:
            for name in shared:
                setattr(self, name, getattr(self._shared, name))
        else:
            # channel field only for full storage (mapping gradients); lean/compact storage
            # computes props from volume.channels (property_volume.fill_props)
            self.vol = (ti.Vector.field(v.n_channels, real, shape=v.shape)
                        if self.storage == "full" else None)
            self.w2v = ti.Matrix.field(4, 4, real, shape=())
            self.gradT = ti.Matrix.field(3, 3, real, shape=())
            self.table = ti.field(real, shape=rows.shape, needs_grad=gm)
            self.chan_tissue = ti.field(ti.i32, shape=len(chan))
            knots = self.mapping.knots if self.mapping.kind == "transfer" else np.zeros((2, 3))
            self.tf = ti.field(real, shape=knots.shape, needs_grad=gm)
            n_mlp = self.mapping.mlp.n_params if self.mapping.kind == "mlp" else 1
            self.mlp_w = ti.field(real, shape=n_mlp, needs_grad=gm)
            self.props = ti.Vector.field(3, property_volume.props_dtype(self.storage, real),
                                         shape=self._props_shape, needs_grad=gm)
            self.outside = ti.Vector.field(3, real, shape=())

        # fields of the fused forward path; the staged path's own fields come with
        # _alloc_staged (at construction when gradients or another echo model need them, else on
        # the first staged render): a batch of B frames then costs 4 floats per sample, not ~24
        ge = g and not (self.tape_fused and self.echo_model == "primary")   # forward_tape: no env
        self.iq_i, self.iq_q, self.env, self.bmode = (ti.field(real, shape=(NR, NS), needs_grad=x)
                                                      for x in (g, g, ge, g))
        self._march_t = ti.Vector.field(3, real, shape=(NR, NS),   # fused.march_passes'
                                        layout=ti.Layout.SOA)      # scratch
        # fused.lateral_line's Q sums (CPU; the I sums go into bmode)
        self._lat_q = ti.field(real, shape=(NR, NS)) if self.arch == "cpu" else self.bmode
        ti_, tq = image.axial_taps(p)
        self.K = (len(ti_) - 1) // 2
        self.taps_i = ti.field(real, shape=len(ti_))
        self.taps_q = ti.field(real, shape=len(tq))
        lw = image.lateral_weights(p)
        self.M = (lw.shape[1] - 1) // 2
        self.lat_w = ti.field(real, shape=lw.T.shape)   # (2M+1, S): contiguous along samples
        self.lat_mask = ti.field(real, shape=(p.n_lines, lw.shape[1]))   # fused.lateral_line
        self._taps = (ti_, tq, lw)
        self.sc_base = ti.Vector.field(2, ti.i32, shape=(H, W))
        self.sc_frac = ti.Vector.field(2, real, shape=(H, W))
        self.fan = ti.field(real, shape=(H, W) if self.batch == 1 else (self.batch, H, W), needs_grad=g)
        self._alloc_imaging()
        self._staged = False
        if self.requires_grad or self.echo_model != "primary":
            self._alloc_staged()

    def _alloc_staged(self):
        """Per-stage fields of the staged (differentiable) path, (B n_lines, n_samples) each."""
        if self._staged:
            return
        real, g = self.real, bool(self.requires_grad)
        NR, NS = self.probe.n_lines * self.batch, self.probe.n_samples
        fused = self.tape_fused and self.echo_model == "primary"
        gs = g and not fused              # stages that the fused Tape path skips

        def f2(grad=g):
            return ti.field(real, shape=(NR, NS), needs_grad=grad)

        self.z, self.alpha, self.scat, self.cosw = f2(), f2(), f2(), f2()
        self.logt, self.att2, self.cum, self.echo, self.gain = f2(gs), f2(gs), f2(gs), f2(gs), f2()
        self.rf, self.lat_i, self.lat_q = f2(gs), f2(gs), f2(gs)
        self.scat_q, self.rf_q = f2(), f2(gs)
        self.env_mean = f2(gs)            # used by speckle='mean' only
        if fused and g:                   # adjoint scratch of tape_fused.lateral_envelope_log
            self._gli, self._glq = f2(False), f2(False)      # (and of echo_iq on CPU)
            self._gacc = f2(False)
        # scatterer-sum Jacobians that the march's forward keeps for its backward under a Tape
        # (14 partials and the plane's scattering strength per sample and elevation plane,
        # march.march's jac; one array per component, so that the loops over samples that
        # write and read it vectorise)
        self._sjac = (ti.Vector.field(15, real, shape=(NR, NS, self._n_elev),
                                      layout=ti.Layout.SOA) if g else None)
        self._tape_fused = fused
        if self.echo_model == "layered":
            self.cumatt, self.ret, self.tr2 = f2(), f2(), f2()
            self.sR, self.sRp, self.sP = f2(False), f2(False), f2(False)
        if self.echo_model == "reverb":
            self.trace = f2()
            self.reverb_scratch = echo.ReverbScratch(NR, NS, real, grad=g)   # checkpoints if g
        self._staged = True

    def _upload_static(self):
        """Every pose-independent small field in one kernel launch (:class:`Uploader`: one
        kernel to prepare instead of one per field), then the mapping and the volume."""
        f = self._np_real
        v, p = self.volume, self.probe
        o, d = p.line_geometry()
        ti_, tq, lw = self._taps
        base, frac = scan.scan_lookup(p)
        fields = [self.line_o, self.line_d, self.taps_i, self.taps_q, self.lat_w, self.lat_mask,
                  self.sc_base, self.sc_frac, self.elev_off, self.elev_w]
        arrays = [o, d, ti_, tq, lw.T, image.lateral_frame_mask(p.n_lines, self.M), base, frac,
                  *self._imaging_arrays]
        if self._shared is None:
            A = v.world_to_voxel
            A[:3, 3] -= self.props_origin          # indices of the (cropped) props grid
            fields += [self.w2v, self.gradT]
            arrays += [A, A[:3, :3].T]
        arrays = [np.asarray(a).astype(f if not np.issubdtype(np.asarray(a).dtype, np.integer)
                                       else np.int32) for a in arrays]
        del self._imaging_arrays
        if self._shared is None:
            if self.vol is not None:
                self.vol.from_numpy(v.channels.astype(f, copy=False))
            self.upload_mapping(_static=(fields, arrays))    # one kernel for both groups
        else:
            Uploader(fields)(*arrays)

    def upload_mapping(self, mapping: AcousticMapping | None = None, _static=None):
        """(Re)load the tissue table / transfer knots into their Taichi fields. (_static: the
        start-up's (fields, arrays) of :meth:`_upload_static`, written by the same launch.)"""
        if mapping is not None:
            mapping.check_volume(self.volume)
            if mapping.kind != self.mapping.kind:
                raise ValueError("cannot switch mapping kind on an existing Simulator")
            self.mapping = mapping
        rows, chan, _ = self.mapping.table_arrays(self.volume)
        f = self._np_real
        kind = self.mapping.kind
        if kind == "mlp" and self.mapping.mlp.n_params != self.mlp_w.shape[0]:
            raise ValueError("cannot change the MLP layout on an existing Simulator")
        outside = np.asarray(self.mapping.knots[0] if kind == "transfer" else rows[0],
                             dtype=np.float64) - [echo.Z_REF, 0.0, 0.0]
        # fields this mapping kind does not use keep their values (zeros from allocation)
        fields, arrays = [self.table, self.chan_tissue, self.outside], [rows, chan, outside]
        if kind == "transfer":
            fields.append(self.tf)
            arrays.append(np.asarray(self.mapping.knots, dtype=np.float64))
        if kind == "mlp":
            fields.append(self.mlp_w)
            arrays.append(self.mapping.mlp.weights)
        arrays = [np.asarray(a).astype(np.int32 if a is chan else f) for a in arrays]
        if _static is not None:
            Uploader(list(_static[0]) + fields)(*_static[1], *arrays)
        else:
            key = tuple(id(x) for x in fields)
            up = getattr(self, "_mapping_uploader", None)
            if up is None or tuple(id(x) for x in up.fields) != key:
                up = self._mapping_uploader = Uploader(fields)
            up(*arrays)
        self.update_acoustics()

    def set_outside(self, props) -> None:
        """Acoustic properties [MRayl, dB/cm/MHz, scattering] assumed outside the volume."""
        p = np.asarray(props, dtype=np.float64) - [echo.Z_REF, 0.0, 0.0]
        self.outside[None] = p.astype(self._np_real)
        if self.props_cropped:
            bg = np.asarray(self.mapping.knots[0] if self.mapping.kind == "transfer"
                            else self.mapping.table_arrays(self.volume)[0][0], dtype=np.float64)
            if not np.allclose(bg, props, rtol=1e-3, atol=1e-6):
                log.warning("compact storage: props cover only the content box %s..%s of the "
                            "volume and the empty margin now reads the outside value %s instead "
                            "of the background %s; use storage='lean' for a different outside",
                            self.props_origin, tuple(np.add(self.props_origin, self.props.shape)),
                            np.round(np.asarray(props, float), 4).tolist(), np.round(bg, 4).tolist())

    def update_acoustics(self):
        """Recompute the acoustic-property volume from the channels and mapping fields
        (lean/compact storage: from ``volume.channels``, :func:`property_volume.fill_props`)."""
        if self.vol is None:
            property_volume.fill_props(self)
        elif self.mapping.kind == "mlp":
            from .mlp_mapping import mlp_kernel

            mlp_kernel(self.mapping.mlp)(self.vol, self.volume.intensity_index, self.gradT,
                                         self.mlp_w, self.props)
        else:
            march.acoustic_volume(self.vol, self.table, self.chan_tissue, self.tf, self.tf_chan,
                                  self.props)

    # --- rendering ----------------------------------------------------------------------------
    def set_pose(self, pose: Pose | None = None):
        """Pose of the next :meth:`forward` (every frame of a batch gets it)."""
        return self.set_poses([pose] * self.batch)[0]

    def set_poses(self, poses, seeds=None) -> list:
        """Poses of the B frames of the next :meth:`forward`: a list of B :class:`Pose` /
        6-vectors [mm, rad] / None (default pose), or an array (B, 6); ``seeds`` (B,) scatterer
        realisation per frame (default: ``settings.seed`` for all)."""
        if isinstance(poses, np.ndarray) and poses.ndim == 2:
            poses = [Pose.from_vector(v) for v in poses]
        poses = list(poses)
        if len(poses) != self.batch:
            raise ValueError(f"expected {self.batch} poses (Simulator batch), got {len(poses)}")
        seeds = np.full(self.batch, int(self.settings.seed)) if seeds is None else np.asarray(seeds)
        if seeds.shape != (self.batch,) or not np.issubdtype(seeds.dtype, np.integer):
            raise ValueError(f"seeds must be {self.batch} integers, got {seeds!r}")
        seeds = (seeds.astype(np.int64) & 0xFFFFFFFF).astype(np.uint32).view(np.int32)
        out = [self.volume.default_pose if p is None else p if isinstance(p, Pose)
               else Pose.from_vector(p) for p in poses]
        # kept in NumPy: the fused forward reads them as kernel arguments (and writes the
        # fields); any other reader of the fields gets them through the pose/seeds properties
        self._pose_host = np.stack([p.as_vector() for p in out]).astype(self._np_real)
        self._seeds_host = seeds
        self._pose_stale = True
        cov = {}
        for q in out:
            if id(q) not in cov:
                self._check_coverage(q)
                cov[id(q)] = self.coverage
        self.coverages = [cov[id(q)] for q in out]     # per frame
        self.last_pose = out[-1]
        self.last_poses = out
        return out

    @property
    def pose(self):
        """Field (B, 6) [t mm, rotvec rad] of the frames' poses (:meth:`set_poses`); its
        ``grad`` holds the pose gradient after a ``ti.ad.Tape``. Set poses with
        :meth:`set_pose` / :meth:`set_poses`, not by writing this field: the forward-only
        render takes them from there as kernel arguments."""
        self._flush_poses()
        return self._pose_field

    @property
    def seeds(self):
        """Field (B,) i32 of the frames' scatterer realisations (:meth:`set_poses`)."""
        self._flush_poses()
        return self._seeds_field

    def _flush_poses(self):
        """Write the poses/seeds of the last :meth:`set_poses` into their fields, if no kernel
        has yet (one small launch; kept off a running Tape, like a set-up step before it)."""
        if self.__dict__.get("_pose_stale"):
            with _off_tape():
                rays.set_poses(self._pose_field, self._seeds_field, self._pose_host,
                               self._seeds_host)
            self._pose_stale = False

    def _check_coverage(self, pose: Pose):
        """Warn when no part of the fan lies inside the volume (the image is then empty)."""
        pts = getattr(self, "_coverage_pts", None)
        if pts is None:          # probe-frame points (33 lines x 65 depths), made once
            o, d = self.probe.line_geometry()
            sel = np.linspace(0, len(o) - 1, min(len(o), 33)).astype(int)
            depths = np.linspace(0, self.probe.depth_mm, 65)
            pts = self._coverage_pts = (o[sel, None, :] + depths[None, :, None]
                                        * d[sel, None, :]).reshape(-1, 3)
        inside = self.volume.contains_world(pose.probe_to_world(pts))
        self.coverage = float(inside.mean())     # fraction of the fan inside the volume
        if not inside.any():
            log.warning("probe pose %s: the fan lies entirely outside volume %r; the image is empty",
                        pose.to_string(), self.volume.name)

    def forward(self):
        """Render the pose(s) of the last :meth:`set_poses` into ``self.fan`` (the acoustic-property
        volume is computed by :meth:`update_acoustics`, outside the per-frame path).

        Outside a ``ti.ad.Tape`` the ``primary`` model runs the fused forward-only kernels
        (:mod:`diffus_taichi.fused`: 2 launches, no intermediate fields), inside a Tape the
        fused differentiable ones (:meth:`forward_tape`); the other echo models (and
        ``tape_fused = False``) the staged differentiable kernels (:meth:`forward_staged`)."""
        if self.echo_model != "primary":
            self.forward_staged()
        elif ti.lang.impl.get_runtime().target_tape is None:
            self.forward_fused()
        elif getattr(self, "_tape_fused", self.tape_fused):
            self.forward_tape()
        else:
            self.forward_staged()

    def _rays(self):
        rays.make_rays(self.pose, self.line_o, self.line_d, self.w2v, self.ro, self.rd, self.vo, self.vd)
        if self.speckle_mode == "coherent":
            march.elevation_axes(self.ro, self.rd, self.w2v, self.ey, self.eyv, self.probe.n_lines)

    def forward_fused(self, out: np.ndarray | None = None):
        """Forward-only render (primary model), same result as :meth:`forward_staged` up to
        f32 rounding; fills only ``self.fan`` (and the rays), and ``out`` (a C-contiguous NumPy
        array of the fan's shape and float dtype) when given, in the same kernel."""
        if self.echo_model != "primary":
            raise ValueError("the fused forward path implements the 'primary' echo model only")
        p, s = self.probe, self.settings
        mode = self.speckle_mode
        np_step = echo.NEPER_PER_DB * p.frequency_mhz * p.sample_spacing_mm / 10.0
        fast_call(fused.march_echo_iq, self._pose_host, self._seeds_host, self._pose_field,
                  self._seeds_field, self.line_o, self.line_d, self.w2v, self.props,
                  self.outside, self.vo, self.vd, self.ro, self.rd, self.ey, self.eyv,
                  self.gradT, p.sample_spacing_mm, 1.0 / s.noise_cell_mm, self._k2h(),
                  self.elev_off, self.elev_w, self._n_elev, fused.SPECKLE_MODES[mode], np_step,
                  self.taps_i, self.taps_q, self.K, self.iq_i, self.iq_q,
                  self.env,                      # env: scratch (gain x strength, 'mean')
                  backend.ray_loop_pad(self.iq_i.shape[0]), self.bmode, self.env,
                  self._march_t, self.arch == "cpu")    # scratch on CPU
        self._pose_stale = False                 # the kernel wrote the pose/seeds fields
        tgc = self.tgc_db_per_cm * p.sample_spacing_mm / 10.0
        if out is None:
            out = self.__dict__.get("_no_out")
            if out is None:                      # a placeholder: not written (with_out False)
                out = self._no_out = ti.ndarray(self.real, shape=(1,) * len(self.fan.shape))
            with_out = False
        elif (out.shape != tuple(self.fan.shape) or out.dtype != self._np_real
              or not out.flags.c_contiguous or not out.flags.writeable):
            raise ValueError(f"out must be a writeable C-contiguous {tuple(self.fan.shape)} "
                             f"{np.dtype(self._np_real)} array, got {out.shape} {out.dtype}")
        else:
            with_out = True
        fast_call(fused.bmode_fan, self.iq_i, self.iq_q, self.lat_w, self.lat_mask, self.M,
                  p.n_lines, mode == "mean", self.env, self._speckle_field(mode), s.gain_db, tgc,
                  s.dynamic_range_db, self.bmode, backend.lateral_loop_pad(self.bmode.shape[0]),
                  self.sc_base, self.sc_frac, self.fan, out, with_out, self._lat_q)

    def _march_gsc(self):
        """march.march's gsc: the fused march's scratch on CPU (loops that vectorise), else None."""
        return self._march_t if self.arch == "cpu" else None

    def _march_jac(self):
        """march.march's jac: the Jacobian field under a Tape (gradient Simulators), else None."""
        if getattr(self, "_sjac", None) is None or ti.lang.impl.get_runtime().target_tape is None:
            return None
        return self._sjac

    def forward_staged(self, make_rays: bool = True):
        """Every stage in its own field (Tape-compatible; :meth:`stages` reads them).
        make_rays=False: march the rays already in ro/rd/vo/vd/ey/eyv (e.g. those the fused
        kernel wrote: in f32 they can differ from make_rays' by an ulp of the origin, which
        is ~5e-4 rad of speckle phase at 7.5 MHz; tests compare the two paths on equal rays)."""
        self._alloc_staged()
        p, s = self.probe, self.settings
        if make_rays:
            self._rays()
        coherent = self.speckle_mode == "coherent"
        march.march(self.props, self.outside, self.vo, self.vd, self.ro, self.rd, self.ey, self.eyv,
                    self.gradT, p.sample_spacing_mm, 1.0 / s.noise_cell_mm, self._k2h(), self.seeds,
                    self.elev_off, self.elev_w, self._n_elev, coherent,
                    self.z, self.alpha, self.scat, self.scat_q, self.cosw,
                    backend.ray_loop_pad(self.z.shape[0]), self._march_jac(), self._march_gsc())
        np_step = echo.NEPER_PER_DB * p.frequency_mhz * p.sample_spacing_mm / 10.0
        echo.step_terms(self.z, self.alpha, np_step, self.logt, self.att2)
        spec = self.echo
        if self.echo_model == "layered":
            echo.exclusive_cumsum(self.att2, self.cumatt)
            echo.layered_stack(self.z, self.ret, self.tr2, self.sR, self.sRp, self.sP)
            echo.layered_combine(self.ret, self.tr2, self.cumatt, self.echo, self.gain)
        else:
            echo.exclusive_cumsum(self.logt, self.cum)
            echo.primary_combine(self.z, self.cosw, self.cum, self.echo, self.gain)
            if self.echo_model == "reverb":   # time-resolved trace replaces the primary echo
                echo.reverb_trace(self.z, self.alpha, np_step, self.trace, self.reverb_scratch)
                spec = self.trace
        scat = self.scat if coherent else self._zero_scat()
        image.form_rf(spec, self.gain, scat, self.scat_q, self.rf, self.rf_q)
        image.axial_iq(self.rf, self.rf_q, self.taps_i, self.taps_q, self.K, coherent,
                       self.iq_i, self.iq_q)
        image.lateral_sum(self.iq_i, self.iq_q, self.lat_w, self.M, p.n_lines, self.lat_i, self.lat_q)
        image.envelope(self.lat_i, self.lat_q, self.env)
        tgc = self.tgc_db_per_cm * p.sample_spacing_mm / 10.0
        env = self.env
        if self.speckle_mode == "mean":
            image.add_incoherent(self.env, self.gain, self.scat, self._speckle_power(),
                                 self.env_mean)
            env = self.env_mean
        image.log_compress(env, s.gain_db, tgc, s.dynamic_range_db, self.bmode)
        scan.scan_convert(self.bmode, self.sc_base, self.sc_frac, self.fan)

    def forward_tape(self):
        """Primary model under ``ti.ad.Tape``: the march, then the fused differentiable kernels
        of :mod:`diffus_taichi.tape_fused` (hand-written adjoints) instead of the stage chain;
        same values as :meth:`forward_staged` (fills z..cosw, gain, iq, lat_i/q, bmode, fan)."""
        from . import tape_fused

        self._alloc_staged()
        p, s = self.probe, self.settings
        self._rays()
        mode = self.speckle_mode
        pad = backend.ray_loop_pad(self.z.shape[0])
        march.march(self.props, self.outside, self.vo, self.vd, self.ro, self.rd, self.ey, self.eyv,
                    self.gradT, p.sample_spacing_mm, 1.0 / s.noise_cell_mm, self._k2h(), self.seeds,
                    self.elev_off, self.elev_w, self._n_elev, mode == "coherent",
                    self.z, self.alpha, self.scat, self.scat_q, self.cosw, pad, self._march_jac(),
                    self._march_gsc())
        np_step = echo.NEPER_PER_DB * p.frequency_mhz * p.sample_spacing_mm / 10.0
        gli, glq = (self._gli, self._glq) if hasattr(self, "_gli") else (self.rf, self.rf_q)
        cpu = self.arch == "cpu"                 # gli, glq: also echo_iq's scratch on CPU
        acc = getattr(self, "_gacc", self.echo)
        tape_fused.echo_iq(self.z, self.alpha, self.scat, self.scat_q, self.cosw, np_step,
                           self.taps_i, self.taps_q, self.K, fused.SPECKLE_MODES[mode], self.gain,
                           self.iq_i, self.iq_q, pad, *((gli, glq, acc) if cpu else (None,) * 3))
        tgc = self.tgc_db_per_cm * p.sample_spacing_mm / 10.0
        tape_fused.lateral_envelope_log(self.iq_i, self.iq_q, self.lat_w, self.lat_mask, self.M,
                                        p.n_lines, mode == "mean", self.gain, self.scat,
                                        self._speckle_field(mode),
                                        s.gain_db, tgc, s.dynamic_range_db, self.lat_i,
                                        self.lat_q, gli, glq, self.bmode,
                                        backend.lateral_loop_pad(self.bmode.shape[0]))
        adj = getattr(self, "_scan_adj", None)
        if adj is None:
            scan.scan_convert(self.bmode, self.sc_base, self.sc_frac, self.fan)
        else:
            scan.scan_convert_ad(self.bmode, self.sc_base, self.sc_frac, self.fan, adj)

    def _prepare_tape(self):
        """Fields the Tape path builds on first use (outside the Tape: they are uploaded)."""
        if (self.echo_model == "primary" and getattr(self, "_tape_fused", False)
                and getattr(self, "_scan_adj", None) is None):
            self._scan_adj = scan.ScanAdjoint(self.sc_base.to_numpy(), self.sc_frac.to_numpy(),
                                              self.probe.n_lines, self.probe.n_samples, self.real)

    def _alloc_imaging(self):
        """Fields and constants of the coherent scatterer model (march.scatterer_sum) and the
        elevation planes; called at the end of :meth:`_alloc`."""
        real, g = self.real, bool(self.requires_grad)
        p, st = self.probe, self.settings
        NR, NS = p.n_lines * self.batch, p.n_samples
        self.ey, self.eyv = (ti.Vector.field(3, real, shape=NR, needs_grad=g) for _ in range(2))
        self._n_elev = int(st.elevation_planes)
        off, w = image.elevation_planes(p, self._n_elev)
        self.elev_off = ti.field(real, shape=off.shape)
        self.elev_w = ti.field(real, shape=w.shape)
        # per-depth expected speckle power: made on first use (:meth:`_speckle_power`)
        self._speckle_c = ti.field(real, shape=NS)
        self._speckle_c_ready = False
        self._elev_w_np = w
        # uploaded with the other static fields by _upload_static (one kernel launch)
        self._imaging_arrays = (off, w)

    def _speckle_power(self):
        """Field (n_samples,) of the expected coherent-speckle power per depth
        (:func:`image.speckle_power_factor`) that ``speckle='mean'`` needs; computed and
        uploaded on its first use (a NumPy computation of ~18 ms at 256x512 that the other
        modes never need; with the settings at that time), off any running Tape."""
        if not self._speckle_c_ready:
            p, st = self.probe, self.settings
            ti_, tq, lw = self._taps
            c = image.speckle_power_factor(ti_, tq, lw, p.sample_spacing_mm, st.noise_cell_mm,
                                           self._elev_w_np, image.line_spacing_mm(p))
            c = np.broadcast_to(np.asarray(c, dtype=np.float64), (p.n_samples,))
            with _off_tape():
                self._speckle_c.from_numpy(c.astype(self._np_real))
            self._speckle_c_ready = True
        return self._speckle_c

    def _speckle_field(self, mode: str):
        """The speckle-power field for the image-formation kernels: :meth:`_speckle_power` in
        ``'mean'`` mode, else the (unread) field as it is."""
        return self._speckle_power() if mode == "mean" else self._speckle_c

    def _k2h(self) -> float:
        """Round-trip wavenumber 2k = 4 pi / wavelength times the scatterer cell (rad)."""
        return 4.0 * np.pi / self.probe.wavelength_mm * self.settings.noise_cell_mm

    @property
    def speckle_mode(self) -> str:
        """'coherent', 'mean' or 'off' (from ``settings.speckle``)."""
        sp = self.settings.speckle
        return {True: "coherent", False: "off"}.get(sp, sp)

    @property
    def tgc_db_per_cm(self) -> float:
        """Time-gain compensation slope in use (dB/cm)."""
        t = self.settings.tgc_db_per_cm
        return 1.2 * self.probe.frequency_mhz if t is None else float(t)

    def _zero_scat(self):
        if not hasattr(self, "_zeros"):
            self._zeros = ti.field(self.real, shape=self.z.shape)
        return self._zeros

    def render(self, pose: Pose | None = None) -> np.ndarray:
        """Fan image (H, W) float32 in [0, 1] (row 0 = shallowest) for ``pose`` (default: the
        volume's default pose)."""
        self.set_pose(pose)
        return self._forward_numpy()

    def _forward_numpy(self) -> np.ndarray:
        """:meth:`forward`, and the fan as a new NumPy array: written by the fused kernel itself
        outside a Tape (no copy kernel to prepare at start-up), else (other echo models, inside
        a Tape, or a subclass with its own ``forward``) ``forward()`` and ``fan.to_numpy()``."""
        if (self.echo_model == "primary" and type(self).forward is Simulator.forward
                and ti.lang.impl.get_runtime().target_tape is None):
            out = np.empty(tuple(self.fan.shape), dtype=self._np_real)
            self.forward_fused(out=out)
            return out
        self.forward()
        return self.fan.to_numpy()

    def render_batch(self, poses, seeds=None) -> np.ndarray:
        """Fan images (B, H, W) float32 in [0, 1] of B poses (B = the Simulator's ``batch``;
        list of Pose or array (B, 6) [mm, rad]), rendered in one launch per stage; ``seeds``
        (B,) optional scatterer realisation per frame."""
        self.set_poses(poses, seeds)
        fan = self._forward_numpy()
        return fan[None] if self.batch == 1 else fan

    def pose_jacobian(self, pose: Pose | None = None, step_mm: float = 0.05,
                      step_rad: float = 1e-3) -> np.ndarray:
        """Jacobian (H, W, 6) of the fan image w.r.t. the pose vector [tx, ty, tz (mm), wx, wy,
        wz (rad)] at ``pose``, by central differences (steps ``step_mm`` / ``step_rad``): the 12
        displaced poses render as one batch (a batch-12 Simulator sharing this one's volume,
        built on first use). Same scatterer seed as :meth:`render`."""
        if not (step_mm > 0 and step_rad > 0):
            raise ValueError(f"steps must be > 0, got step_mm={step_mm}, step_rad={step_rad}")
        pose = self.volume.default_pose if pose is None else pose
        v = (pose if isinstance(pose, Pose) else Pose.from_vector(pose)).as_vector()
        jac = self.batch_sibling(12)
        h = np.array([step_mm] * 3 + [step_rad] * 3)
        d = np.concatenate([np.diag(h), -np.diag(h)])            # (12, 6): +h_i then -h_i
        fans = jac.render_batch(v[None, :] + d).astype(np.float64)
        return np.moveaxis((fans[:6] - fans[6:]) / (2.0 * h[:, None, None]), 0, -1)

    def batch_sibling(self, batch: int) -> "Simulator":
        """A Simulator with ``batch`` frames per launch sharing this one's volume, mapping and
        acoustic-property fields (no extra volume memory) and imaging settings; built on first
        use, rebuilt when the settings change."""
        from dataclasses import asdict

        sibs = self.__dict__.setdefault("_siblings", {})
        sib = sibs.get(batch)
        if sib is None or asdict(sib.settings) != asdict(self.settings):
            sib = sibs[batch] = Simulator(self.volume, probe=self.probe, mapping=self.mapping,
                                          echo_model=self.echo_model, arch=self.arch,
                                          precision=self.precision, batch=batch,
                                          share_volume_with=self, **asdict(self.settings))
        return sib

    def loss_batch(self, poses, batch: int = 16) -> np.ndarray:
        """Losses (n,) against the target of :meth:`set_loss` at n poses (no gradient), the
        renders ``batch`` at a time (:meth:`batch_sibling`); equal to :meth:`loss` pose by pose."""
        if not hasattr(self, "loss_fn"):
            raise RuntimeError("no target: call set_loss(target, ...) first")
        poses = list(poses)
        if not poses:
            return np.zeros(0)
        bs = self.batch_sibling(max(1, min(int(batch), len(poses))))
        out = []
        for b0 in range(0, len(poses), bs.batch):
            chunk = poses[b0:b0 + bs.batch]
            bs.set_poses(chunk + [chunk[-1]] * (bs.batch - len(chunk)))
            bs.forward()
            for b in range(len(chunk)):
                if bs.batch == 1:
                    scan.copy_field(bs.fan, self.fan)
                else:
                    scan.copy_frame(bs.fan, b, self.fan)
                self.loss_fn.reset()
                self.loss_fn.compute(self._image_for_loss())
                out.append(float(self.loss_fn.value[None]))
        self.last_pose = bs.last_pose
        return np.array(out)

    def stages(self) -> dict:
        """Every stage of the last render as numpy arrays (lines x samples unless noted; the
        last pose(s) are re-rendered through the staged kernels)."""
        self.forward_staged()
        out = {
            "ray_origin_mm": self.ro.to_numpy(), "ray_direction": self.rd.to_numpy(),
            "impedance_MRayl": self.z.to_numpy() + echo.Z_REF, "attenuation_dB_cm_MHz": self.alpha.to_numpy(),
            "scatterers": self.scat.to_numpy(), "scatterers_q": self.scat_q.to_numpy(),
            "incidence_cos": self.cosw.to_numpy(),
            "echo": (self.trace if self.echo_model == "reverb" else self.echo).to_numpy(),
            "two_way_gain": self.gain.to_numpy(), "rf": self.rf.to_numpy(),
            "iq_i": self.lat_i.to_numpy(), "iq_q": self.lat_q.to_numpy(),
            "envelope": self.env.to_numpy(), "bmode_lines": self.bmode.to_numpy(),
            "fan": self.fan.to_numpy(),
        }
        return out

    def geometry(self) -> dict:
        """Pose, probe and fan geometry of the last render (for saving with the stages)."""
        x, z = self.probe.fan_axes_mm()
        return {"pose_vector_mm_rad": self.last_pose.as_vector(), "pose_matrix": self.last_pose.matrix,
                "fan_x_mm": x, "fan_z_mm": z, "sample_depth_mm": self.probe.sample_depths_mm(),
                "line_angles_rad": self.probe.line_angles_rad(), "volume_affine": self.volume.affine}

    def reslice(self, pose: Pose | None = None) -> np.ndarray:
        """MRI (display channel) resliced on the fan pixel grid in the image plane: (H, W)."""
        pose = self.last_pose if pose is None else pose
        x, z = self.probe.fan_axes_mm()
        X, Z = np.meshgrid(x, z)
        pts = np.stack([X, np.zeros_like(X), Z], -1)
        idx = self.volume.world_to_index(pose.probe_to_world(pts))
        return sample_trilinear_np(self.volume.display_channel(), idx)

    # --- losses and gradients -----------------------------------------------------------------
    def fan_mask(self) -> np.ndarray:
        """(H, W) bool: pixels inside the fan sector."""
        return self.probe.scan_grid()[2]

    def set_loss(self, target: np.ndarray, loss: str = "ncc", mask="fan", blur_px: float = 0.0,
                 patch_px: int = 16) -> None:
        """Compare every later render with ``target`` (H, W fan image in this probe's geometry).

        mask: ``"fan"`` (inside the sector), None (all pixels) or an (H, W) array.
        blur_px: Gaussian blur (sigma, fan pixels) applied to the render and the target."""
        from . import losses

        target = np.asarray(target, dtype=np.float64)
        if target.shape != tuple(self.probe.image_px):
            raise ValueError(f"target image shape {target.shape} != fan image shape "
                             f"{tuple(self.probe.image_px)} of this probe")
        m = self.fan_mask() if isinstance(mask, str) and mask == "fan" else mask
        if blur_px > 0:
            if getattr(self, "_blur", None) is None or self._blur[0] != blur_px:
                taps = losses.gaussian_taps(blur_px)
                H, W = self.probe.image_px
                g = bool(self.requires_grad)
                tf_ = ti.field(self.real, shape=len(taps))
                tmp = ti.field(self.real, shape=(H, W), needs_grad=g)
                out = ti.field(self.real, shape=(H, W), needs_grad=g)
                tf_.from_numpy(taps.astype(self._np_real))
                self._blur = (blur_px, tf_, (len(taps) - 1) // 2, tmp, out)
            target = losses.blur_np(target, blur_px)
        self._use_blur = blur_px > 0
        old = getattr(self, "loss_fn", None)
        if old is not None and (old.kind, old.shape, old.patch) == (loss, target.shape, int(patch_px)):
            old.set_target(target, m)      # reuse the fields (Taichi fields are never freed)
        else:
            self.loss_fn = losses.ImageLoss(loss, target, m, patch_px, self.real,
                                            needs_grad=bool(self.requires_grad))

    def _image_for_loss(self):
        from . import losses

        if not getattr(self, "_use_blur", False):
            return self.fan
        _, taps, K, tmp, out = self._blur
        losses._gauss_blur_x(self.fan, taps, K, tmp)
        losses._gauss_blur_y(tmp, taps, K, out)
        return out

    def loss(self, pose: Pose | None = None) -> float:
        """Loss of the render at ``pose`` against the target of :meth:`set_loss` (no gradient)."""
        self.set_pose(pose)
        self.loss_fn.reset()
        self.forward()
        self.loss_fn.compute(self._image_for_loss())
        return float(self.loss_fn.value[None])

    def value_and_grad(self, pose: Pose | None = None, target: np.ndarray | None = None,
                       loss: str = "ncc", wrt=("pose",), **loss_kw):
        """Loss and its gradients.

        Returns (loss, grads) with grads["pose"] (6,) = d loss / d [tx, ty, tz (mm), wx, wy, wz
        (rad)]; with ``"mapping" in wrt`` also grads["table"] (T, 3) (rows ``self.table_names``,
        columns MRayl, dB/cm/MHz, scattering) and grads["knots"] (K, 3) for a transfer mapping
        or grads["mlp"] (P,) (flat MLP weights) for an MLP mapping.
        ``target`` (optional) calls :meth:`set_loss` first."""
        if not self.requires_grad:
            raise RuntimeError("this Simulator was built with requires_grad=False")
        if "mapping" in wrt and self.requires_grad is not True:
            raise RuntimeError("mapping gradients need Simulator(requires_grad=True)")
        if target is not None:
            self.set_loss(target, loss, **loss_kw)
        if not hasattr(self, "loss_fn"):
            raise RuntimeError("no target: call set_loss(target, ...) or pass target=")
        self.set_pose(pose)
        self.loss_fn.reset()
        self._prepare_tape()
        clear_all_gradients()            # one launch (the Tape's own clear: one per field)
        with ti.ad.Tape(loss=self.loss_fn.value, clear_gradients=False):
            if "mapping" in wrt:
                self.update_acoustics()
            self.forward()
            self.loss_fn.compute(self._image_for_loss())
        return float(self.loss_fn.value[None]), self._grads(wrt)

    def vjp(self, pose: Pose | None, fan_grad: np.ndarray, wrt=("pose",)) -> dict:
        """Vector-Jacobian product: d(sum(fan * fan_grad)) / d parameters, for use inside other
        optimisers (e.g. as the backward of a PyTorch/JAX custom function)."""
        from . import losses

        fan_grad = np.asarray(fan_grad, dtype=self._np_real)
        if fan_grad.shape != tuple(self.probe.image_px):
            raise ValueError(f"fan_grad shape {fan_grad.shape} != {tuple(self.probe.image_px)}")
        if not hasattr(self, "_vjp_w"):
            self._vjp_w = ti.field(self.real, shape=fan_grad.shape)
            self._vjp_out = ti.field(self.real, shape=(), needs_grad=True)
        self._vjp_w.from_numpy(fan_grad)
        self.set_pose(pose)
        self._prepare_tape()
        clear_all_gradients()
        with ti.ad.Tape(loss=self._vjp_out, clear_gradients=False):
            if "mapping" in wrt:
                self.update_acoustics()
            self.forward()
            losses.weighted_sum(self.fan, self._vjp_w, self._vjp_out)
        return self._grads(wrt)

    def _grads(self, wrt) -> dict:
        out = {"pose": self.pose.grad.to_numpy().astype(np.float64).reshape(6)}
        if "mapping" in wrt:
            out["table"] = self.table.grad.to_numpy().astype(np.float64)
            if self.mapping.kind == "transfer":
                out["knots"] = self.tf.grad.to_numpy().astype(np.float64)
            if self.mapping.kind == "mlp":
                out["mlp"] = self.mlp_w.grad.to_numpy().astype(np.float64)
        return out

    def set_mapping_params(self, table: np.ndarray | None = None, knots: np.ndarray | None = None,
                           mlp: np.ndarray | None = None):
        """Write raw parameter arrays (as in :meth:`mapping_params`) into the Taichi fields and
        recompute the acoustic-property volume."""
        if table is not None:
            table = np.asarray(table, dtype=np.float64)
            self.table.from_numpy(table.astype(self._np_real))
            if self.mapping.kind == "tissue":
                self.mapping.overrides.update({n: tuple(map(float, row))
                                               for n, row in zip(self.table_names, table)})
                self.set_outside(table[0])
        if knots is not None:
            knots = np.asarray(knots, dtype=np.float64)
            self.tf.from_numpy(knots.astype(self._np_real))
            if self.mapping.kind == "transfer":
                self.mapping.knots = knots.copy()
                self.set_outside(knots[0])
        if mlp is not None:
            if self.mapping.kind != "mlp":
                raise ValueError("set_mapping_params(mlp=...) needs an 'mlp' mapping")
            mlp = np.asarray(mlp, dtype=np.float64).ravel()
            if mlp.shape != (self.mapping.mlp.n_params,) or not np.all(np.isfinite(mlp)):
                raise ValueError(f"mlp weights must be {self.mapping.mlp.n_params} finite values")
            self.mlp_w.from_numpy(mlp.astype(self._np_real))
            self.mapping.mlp.weights = mlp.copy()
        self.update_acoustics()

    def mapping_params(self) -> dict:
        out = {"table": self.table.to_numpy().astype(np.float64),
               "knots": self.tf.to_numpy().astype(np.float64)}
        if self.mapping.kind == "mlp":
            out["mlp"] = self.mlp_w.to_numpy().astype(np.float64)
        return out


def sample_trilinear_np(data: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Trilinear sample of a 3-D array at fractional indices (..., 3); 0 outside (NumPy)."""
    shape = np.array(data.shape)
    i0 = np.floor(idx).astype(np.int64)
    f = idx - i0
    out = np.zeros(idx.shape[:-1], dtype=np.float64)
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                ii = i0 + np.array([a, b, c])
                ok = np.all((ii >= 0) & (ii < shape), axis=-1)
                w = (f[..., 0] if a else 1 - f[..., 0]) * (f[..., 1] if b else 1 - f[..., 1]) \
                    * (f[..., 2] if c else 1 - f[..., 2])
                iic = np.clip(ii, 0, shape - 1)
                out += np.where(ok, w * data[iic[..., 0], iic[..., 1], iic[..., 2]], 0.0)
    return out
