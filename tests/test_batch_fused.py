"""The fused forward-only path and batched rendering give the staged, differentiable path's
images: fused == staged (every speckle mode, elevation planes, probe kinds), a batch of B poses ==
B single renders (fused and staged), no leakage between the frames of a batch, clear errors."""
import numpy as np
import pytest
import taichi as ti

from diffus_taichi import Pose, get_probe
from diffus_taichi.simulator import Simulator


def _poses(sim, n, seed=0):
    rng = np.random.default_rng(seed)
    v0 = sim.volume.default_pose.as_vector()
    return [Pose.from_vector(v0 + np.concatenate([rng.uniform(-3, 3, 3), rng.uniform(-0.08, 0.08, 3)]))
            for _ in range(n)]


def _probe(kind="craniotomy"):
    return get_probe(kind, n_lines=48, n_samples=160, image_px=(80, 72))


# Simulators shared by the tests of this module that build the same configuration (a
# Simulator's kernels are compiled for its own fields: building one costs seconds of JIT, a
# render at this size milliseconds). Tests only set poses on them, or change a display setting
# and put it back. Valid while the Taichi runtime that built them lives (an arch or precision
# switch, ti.reset, starts a new one; detected by identity).
_SIMS = {}


def _shared_sim(arch, precision, kind="craniotomy", **settings):
    from taichi.lang import impl

    from diffus_taichi import backend

    backend.ensure(arch, precision)
    rt = impl.get_runtime()
    key = (arch, precision, kind, tuple(sorted(settings.items())))
    hit = _SIMS.get(key)
    if hit is None or hit[0] is not rt:
        if any(r is not rt for r, _ in _SIMS.values()):
            _SIMS.clear()                 # fields of a finished runtime
        _SIMS[key] = (rt, Simulator("brain", probe=_probe(kind), arch=arch, precision=precision,
                                    **settings))
    return _SIMS[key][1]


@pytest.mark.parametrize("settings", [dict(), dict(speckle="mean"), dict(speckle=False),
                                      dict(elevation_planes=3), dict(kind="linear")],
                         ids=["coherent", "mean", "off", "elev3", "linear"])
def test_fused_equals_staged_f64(cpu64, settings):
    sim = _shared_sim("cpu", "f64", **settings)
    settings = dict(settings)
    settings.pop("kind", None)
    for P in _poses(sim, 2):
        sim.set_pose(P)
        sim.forward_fused()
        a = sim.fan.to_numpy()
        sim.forward_staged()
        b = sim.fan.to_numpy()
        assert a.std() > 0.05 or settings.get("speckle") is False
        assert (a > 0).mean() > 0.02                # something was rendered
        np.testing.assert_allclose(a, b, atol=1e-11, rtol=0)


@pytest.mark.parametrize("settings", [dict(), dict(elevation_planes=3), dict(speckle="mean")],
                         ids=["coherent", "elev3", "mean"])
def test_numpy_reference_equals_render_f64(cpu64, settings):
    """An independent vectorised NumPy implementation of the whole primary pipeline
    (benchmarks/reference_numpy.py) gives the fused render to f64 rounding."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from reference_numpy import render_primary_numpy

    sim = _shared_sim("cpu", "f64", **settings)     # the Simulator of test_fused_equals_staged_f64
    P = _poses(sim, 1, seed=6)[0]
    a = sim.render(P)
    assert a.std() > 0.05
    np.testing.assert_allclose(render_primary_numpy(sim, P), a, atol=1e-9, rtol=0)


def test_fused_equals_staged_f32_every_backend(arch):
    """On the same rays (the fused kernel makes its own: in f32 an ulp of a ray origin is
    ~5e-4 rad of speckle phase, so the paths are compared on the rays it wrote)."""
    sim = _shared_sim(arch, "f32")
    for P in _poses(sim, 2, seed=1):
        sim.set_pose(P)
        sim.forward_fused()
        a = sim.fan.to_numpy()
        sim.forward_staged(make_rays=False)
        b = sim.fan.to_numpy()
        assert np.abs(a - b).max() < 2e-5, (arch, np.abs(a - b).max())
        sim.forward_staged()            # its own rays: the same image up to that phase noise
        c = sim.fan.to_numpy()
        assert np.abs(a - c).mean() < 1e-5 and np.abs(a - c).max() < 0.01, np.abs(a - c).max()


# The two f64 gradient tests below build their own Simulators right after an arch switch
# (ti.reset), where they were before: Taichi's offline-cache keys include the SNode ids, which
# restart at a reset, so a Simulator built first in a fresh runtime can reuse kernels compiled
# for the same configuration earlier in the run, whereas built later in a shared runtime it
# compiles everything again (measured: test_pose_jacobian_matches_reverse_mode 9 s -> 42 s).
def test_render_uses_fused_outside_tape_and_staged_inside(cpu64):
    """render() (fused) and value_and_grad (staged, under the Tape) see the same image."""
    sim = Simulator("brain", probe=_probe(), arch="cpu", precision="f64", requires_grad="pose")
    P = _poses(sim, 1, seed=2)[0]
    img = sim.render(P)
    sim.set_loss(img, "mse", mask=None)
    loss, g = sim.value_and_grad(P)
    assert loss < 1e-20                              # the Tape's staged render == render()
    assert g["pose"].shape == (6,)


def test_batch_equals_single_renders(arch):
    """A batch of B poses, rendered by the fused and by the staged path, equals B single renders
    (both paths on one batched Simulator: it allocates the staged fields on first use)."""
    B = 3
    single = _shared_sim(arch, "f32")
    batched = Simulator("brain", probe=_probe(), arch=arch, batch=B, share_volume_with=single)
    poses = _poses(single, B, seed=3)
    ref = {"fused": np.stack([single.render(P) for P in poses]), "staged": []}
    for P in poses:
        single.set_pose(P)
        single.forward_staged()
        ref["staged"].append(single.fan.to_numpy())
    rays = {}
    for path in ("fused", "staged"):
        batched.set_poses(poses)
        getattr(batched, "forward_" + path)()
        out = batched.fan.to_numpy()
        # the fused kernel makes the rays itself and writes them: the same as make_rays and
        # elevation_axes of the staged path
        rays[path] = [f.to_numpy() for f in (batched.ro, batched.rd, batched.vo, batched.vd,
                                             batched.ey, batched.eyv)]
        assert out.shape == (B,) + tuple(_probe().image_px)
        for b in range(B):   # frames differ from each other, and each equals its single render
            assert np.abs(out[b] - out[(b + 1) % B]).mean() > 0.02, (path, b)
            err = np.abs(out[b] - ref[path][b]).max()
            assert err < 2e-5, (arch, path, b, err)
        # render_batch also takes an array (B, 6)
        out2 = batched.render_batch(np.stack([P.as_vector() for P in poses]))
        np.testing.assert_array_equal(out2, batched.fan.to_numpy())
    for a, b in zip(rays["fused"], rays["staged"]):
        assert np.abs(b).max() > 0.1
        np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max(), rtol=0)


def test_pose_fields_follow_set_poses(cpu32):
    """set_poses only keeps the poses/seeds in NumPy: the fused kernel reads them as arguments
    and writes the pose/seed fields itself, and any other reader of ``sim.pose`` / ``sim.seeds``
    (the staged path, the user) gets them written on access (under a Tape without being
    recorded: value_and_grad's set_pose, checked against finite differences in
    test_gradients.py)."""
    sim = Simulator("brain", probe=_probe(), arch="cpu", batch=2)
    poses = _poses(sim, 2, seed=7)
    want = np.stack([P.as_vector() for P in poses]).astype(np.float32)
    sim.set_poses(poses, seeds=[5, 9])
    assert sim._pose_stale
    sim.forward_fused()                                  # the kernel writes the fields
    assert not sim._pose_stale
    np.testing.assert_array_equal(sim._pose_field.to_numpy(), want)
    np.testing.assert_array_equal(sim._seeds_field.to_numpy(), [5, 9])
    sim.set_poses(poses[::-1], seeds=[1, 2])             # a reader of the fields flushes them
    np.testing.assert_array_equal(sim.pose.to_numpy(), want[::-1])
    np.testing.assert_array_equal(sim.seeds.to_numpy(), [1, 2])
    assert not sim._pose_stale
    sim._rays()                                # make_rays (the staged path) from those fields
    staged = [f.to_numpy() for f in (sim.ro, sim.rd, sim.vo, sim.vd)]
    sim.render_batch(poses[::-1], seeds=[1, 2])         # the fused kernel's own rays
    for a, f in zip(staged, (sim.ro, sim.rd, sim.vo, sim.vd)):
        np.testing.assert_allclose(f.to_numpy(), a, atol=1e-5 * np.abs(a).max(), rtol=0)


def test_speckle_power_made_on_first_mean_use(cpu32, monkeypatch):
    """The per-depth speckle power (speckle='mean' only) is computed on its first use, also
    when that is inside value_and_grad's Tape (the upload is not recorded on the Tape, nor is
    the deferred pose upload; the gradient equals the one of a second call), and equals
    image.speckle_power_factor."""
    from diffus_taichi import image

    recorded = []
    insert = ti.ad.Tape.insert

    def spy(self, func, args):
        recorded.append(getattr(getattr(func, "func", func), "__name__", str(func)))
        return insert(self, func, args)

    monkeypatch.setattr(ti.ad.Tape, "insert", spy)

    sim = _shared_sim("cpu", "f32")
    sim.render(_poses(sim, 1, seed=8)[0])
    assert not sim._speckle_c_ready                     # coherent speckle: never needed
    g = Simulator("brain", probe=_probe(), arch="cpu", requires_grad="pose", speckle="mean",
                  share_volume_with=sim)
    assert not g._speckle_c_ready
    P = _poses(sim, 1, seed=9)[0]
    g.set_loss(np.full(tuple(g.fan.shape), 0.5, np.float32), "mse", mask=None)
    v1, g1 = g.value_and_grad(P)                         # first use: inside the Tape
    assert g._speckle_c_ready
    # neither that upload nor value_and_grad's deferred pose upload (set_poses, flushed by the
    # first reader of the pose field, make_rays) is on the Tape
    assert "make_rays" in recorded and not any("ext_arr" in n for n in recorded), recorded
    assert "set_poses" not in recorded, recorded
    v2, g2 = g.value_and_grad(P)
    assert np.isfinite(g1["pose"]).all() and np.abs(g1["pose"]).max() > 0
    assert v1 == v2
    np.testing.assert_array_equal(g1["pose"], g2["pose"])
    p, st = g.probe, g.settings
    want = image.speckle_power_factor(*g._taps, p.sample_spacing_mm, st.noise_cell_mm,
                                      g._elev_w_np, image.line_spacing_mm(p))
    np.testing.assert_allclose(g._speckle_c.to_numpy(), want, rtol=1e-6)


def test_batch_of_identical_poses_has_identical_frames(cpu32):
    """No leakage across frames: the lateral beam and elevation axes stop at frame edges."""
    sim = Simulator("brain", probe=_probe(), arch="cpu", batch=4)
    P = _poses(sim, 1, seed=4)[0]
    out = sim.render_batch([P] * 4)
    for b in range(1, 4):
        np.testing.assert_array_equal(out[b], out[0])
    sim.forward_staged(make_rays=False)      # on the fused kernel's rays (f32 ulps)
    st = sim.fan.to_numpy()
    np.testing.assert_allclose(st, out, atol=2e-5, rtol=0)


def test_batch_errors(cpu32):
    with pytest.raises(ValueError, match="batch"):
        Simulator("brain", probe=_probe(), arch="cpu", batch=0)
    with pytest.raises(ValueError, match="batch"):
        Simulator("brain", probe=_probe(), arch="cpu", batch=2.5)
    with pytest.raises(ValueError, match="gradients"):
        Simulator("brain", probe=_probe(), arch="cpu", batch=2, requires_grad="pose")
    sim = Simulator("brain", probe=_probe(), arch="cpu", batch=2)
    with pytest.raises(ValueError, match="expected 2 poses"):
        sim.render_batch([None])
    with pytest.raises(ValueError, match="seeds must be 2 integers"):
        sim.render_batch([None, None], seeds=[1.5, 2.0])
    with pytest.raises(ValueError, match="NaN|Inf"):
        sim.render_batch(np.full((2, 6), np.nan))
    layered = Simulator("brain", probe=_probe(), arch="cpu", echo_model="layered")
    with pytest.raises(ValueError, match="primary"):
        layered.forward_fused()
    # forward_fused's NumPy output: the fan's shape and the Simulator's float dtype
    fans = sim.render_batch([None, None])
    for bad in (np.zeros((3, 3), np.float32), np.zeros(fans.shape, np.float64),
                np.zeros(fans.shape[::-1], np.float32).T):
        with pytest.raises(ValueError, match="out must be"):
            sim.forward_fused(out=bad)
    out = np.zeros(fans.shape, np.float32)
    sim.forward_fused(out=out)
    assert np.array_equal(out, fans) and np.array_equal(out, sim.fan.to_numpy())
    ti.sync()


def test_pose_jacobian_matches_reverse_mode(cpu64):
    """w . J (12 displaced poses rendered as one batch, central differences) equals the
    reverse-mode vector-Jacobian product d(sum w * fan)/d pose (speckle 'mean': smooth)."""
    sim = Simulator("brain", probe=_probe(), arch="cpu", precision="f64", requires_grad="pose",
                    speckle="mean")
    P = _poses(sim, 1, seed=5)[0]
    J = sim.pose_jacobian(P, step_mm=1e-4, step_rad=1e-6)
    assert J.shape == tuple(_probe().image_px) + (6,)
    assert np.all(np.abs(J).reshape(-1, 6).max(0) > 1e-3)     # every parameter moves the image
    w = np.random.default_rng(0).standard_normal(J.shape[:2])
    g = sim.vjp(P, w)["pose"]
    np.testing.assert_allclose(np.tensordot(w, J, 2), g, rtol=2e-3, atol=2e-3 * np.abs(g).max())
    with pytest.raises(ValueError, match="steps"):
        sim.pose_jacobian(P, step_mm=0.0)


@pytest.mark.parametrize("loss", ["ncc", "lc2"])
def test_loss_batch_equals_loss(cpu32, loss):
    """loss_batch (renders 4 at a time, last batch padded) == loss() pose by pose; used by the
    pose search's start screening."""
    from taichi.lang import impl

    # one Simulator (and its batch-4 sibling) for both losses: set_loss replaces the target
    rt = impl.get_runtime()
    if _SIMS.get("loss_batch", (None,))[0] is not rt:
        _SIMS["loss_batch"] = (rt, Simulator("brain", probe=_probe(), arch="cpu", requires_grad="pose"))
    sim = _SIMS["loss_batch"][1]
    poses = _poses(sim, 6, seed=7)
    sim.set_loss(sim.render(poses[0]), loss, blur_px=1.0 if loss == "ncc" else 0.0)
    one = np.array([sim.loss(P) for P in poses])
    many = sim.loss_batch(poses, batch=4)
    assert one[0] < one[1:].min()              # the target pose scores best
    np.testing.assert_allclose(many, one, rtol=1e-5, atol=1e-6)


def test_padded_ray_loops_equal_plain_ones(cpu32):
    """The per-ray kernels iterate over n_rays x pad indices on CPU (backend.ray_loop_pad, so
    that Taichi spreads few rays over every thread); every pad must give the pad=1 result."""
    from diffus_taichi import backend, echo, fused, march, scan

    sim = _shared_sim("cpu", "f32")
    nr = sim.iq_i.shape[0]
    assert backend.ray_loop_pad(nr) * nr >= backend.RAY_LOOP_MIN_ITERS
    assert backend.ray_loop_pad(10 ** 6) == 1
    sim.set_pose(_poses(sim, 1, seed=5)[0])
    sim._rays()
    p, s = sim.probe, sim.settings
    np_step = echo.NEPER_PER_DB * p.frequency_mhz * p.sample_spacing_mm / 10.0
    out = []      # also split into passes over the samples (march_passes, the CPU form)
    for pad, split in ((1, False), (7, False), (1, True), (7, True)):
        fused.march_echo_iq(sim._pose_host, sim._seeds_host, sim.pose, sim.seeds, sim.line_o,
                            sim.line_d, sim.w2v, sim.props, sim.outside, sim.vo, sim.vd, sim.ro,
                            sim.rd, sim.ey, sim.eyv, sim.gradT, p.sample_spacing_mm,
                            1.0 / s.noise_cell_mm, sim._k2h(), sim.elev_off, sim.elev_w,
                            sim._n_elev, 0,
                            np_step, sim.taps_i, sim.taps_q, sim.K, sim.iq_i, sim.iq_q, sim.env,
                            pad, sim.bmode, sim.env, sim._march_t, split)
        out.append(np.stack([sim.iq_i.to_numpy(), sim.iq_q.to_numpy()]))
    assert np.abs(out[0]).max() > 0
    for o in out[1:]:
        np.testing.assert_allclose(o, out[0], rtol=0, atol=1e-6 * np.abs(out[0]).max())
    # the lateral sum: one thread per output (pad 0, GPU) or one task per line with a loop
    # over samples (pad >= 1, CPU); also with the 'mean' term
    tgc = sim.tgc_db_per_cm * p.sample_spacing_mm / 10.0
    sim.env.from_numpy(np.abs(sim.iq_q.to_numpy()))       # some incoherent term
    for mean in (False, True):
        lines = []
        for pad in (0, 1, 3):
            fan = np.full(tuple(sim.fan.shape), -1.0, sim._np_real)
            fused.bmode_fan(sim.iq_i, sim.iq_q, sim.lat_w, sim.lat_mask, sim.M, p.n_lines,
                            mean, sim.env,
                            sim._speckle_power(), s.gain_db, tgc, s.dynamic_range_db, sim.bmode,
                            pad,
                            sim.sc_base, sim.sc_frac, sim.fan, fan, True, sim._lat_q)
            lines.append(sim.bmode.to_numpy())
            assert np.array_equal(fan, sim.fan.to_numpy())    # the ndarray copy of the fan
            scan.scan_convert(sim.bmode, sim.sc_base, sim.sc_frac, sim.fan)
            assert np.array_equal(fan, sim.fan.to_numpy())    # = the scan_convert kernel
        assert 0.05 < lines[0].mean() < 0.95 and lines[0].std() > 0.02, (mean, lines[0].mean())
        for b in lines[1:]:
            np.testing.assert_allclose(b, lines[0], rtol=0, atol=2e-6)
    sim._alloc_staged()
    got = []
    for pad, gsc in ((1, None), (5, None), (1, sim._march_t), (5, sim._march_t)):
        # gsc: the incidence angles in a loop of their own (CPU: it vectorises)
        march.march(sim.props, sim.outside, sim.vo, sim.vd, sim.ro, sim.rd, sim.ey, sim.eyv,
                    sim.gradT, p.sample_spacing_mm, 1.0 / s.noise_cell_mm, sim._k2h(), sim.seeds,
                    sim.elev_off, sim.elev_w, sim._n_elev, True, sim.z, sim.alpha, sim.scat,
                    sim.scat_q, sim.cosw, pad, None, gsc)
        got.append(np.stack([f.to_numpy() for f in (sim.z, sim.alpha, sim.scat, sim.scat_q, sim.cosw)]))
    for g in got[1:]:
        np.testing.assert_allclose(g, got[0], rtol=0, atol=1e-6 * np.abs(got[0]).max())
