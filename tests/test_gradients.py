"""Gradients of image losses w.r.t. the pose and the acoustic mapping: Tape (hand-written
backward for every loop along a ray) vs central finite differences in f64 on CPU, and every f32
backend vs CPU f64."""
import numpy as np
import pytest

from diffus_taichi import Pose, Volume, backend, get_probe
from diffus_taichi.acoustics import AcousticMapping
from diffus_taichi.mlp_mapping import MLPParams
from diffus_taichi.simulator import Simulator


def _smooth_volume(kind, seed=3, n=40, spacing=1.0):
    rng = np.random.default_rng(seed)
    k = np.fft.fftfreq(n)
    KX, KY, KZ = np.meshgrid(k, k, k, indexing="ij")
    spec = np.exp(-(KX ** 2 + KY ** 2 + KZ ** 2) / (2 * 0.06 ** 2))
    fields = []
    for _ in range(2):
        f = np.real(np.fft.ifftn(np.fft.fftn(rng.normal(size=(n, n, n))) * spec))
        fields.append((f - f.min()) / (f.max() - f.min()))
    affine = np.diag([spacing] * 3 + [1.0])
    affine[:3, 3] = -spacing * (n - 1) / 2
    if kind in ("transfer", "mlp"):
        return Volume(fields[0][..., None], affine, ("intensity",), name="smooth")
    gm = 0.6 * fields[0]
    wm = 0.4 * fields[1]
    return Volume(np.stack([gm, wm], -1), affine, ("grey_matter", "white_matter"), name="smooth")


PROBE = get_probe("craniotomy", n_lines=12, n_samples=40, depth_mm=12.0, radius_mm=5.0,
                  fov_deg=50.0, image_px=(24, 24))
POSE0 = Pose.look_at((0.3, -0.2, 8.0), (0.1, 0.05, -1.0), (1.0, 0.2, 0.0))
SETTINGS = dict(dynamic_range_db=300.0, gain_db=0.0, noise_cell_mm=0.7)   # nothing clips


# MLP on intensity and both neighbourhood features, two hidden layers (static unrolling)
MLP = dict(features=("intensity", "local_mean", "gradient_mm"), hidden=(6, 4), seed=2)
GRAD_KEY = {"tissue": "table", "transfer": "knots", "mlp": "mlp"}


def _mapping(kind):
    if kind == "mlp":
        return AcousticMapping("mlp", mlp=MLPParams(**MLP))
    return AcousticMapping(kind)


def _sim(kind, arch, precision, model="primary", requires_grad=True, loss="mse", **settings):
    mapping = _mapping(kind)
    sim = Simulator(_smooth_volume(kind), probe=PROBE, mapping=mapping, echo_model=model,
                    arch=arch, precision=precision, requires_grad=requires_grad,
                    **{**SETTINGS, **settings})
    _set_target(sim, loss, **settings)
    return sim


def _set_target(sim, loss, **display):
    """Display settings (runtime arguments of the kernels: no rebuild) and the loss against the
    target rendered at a fixed offset from POSE0."""
    for k, v in {**SETTINGS, **display}.items():
        if k == "noise_cell_mm":          # fixed at construction (speckle power factor)
            assert sim.settings.noise_cell_mm == v
        else:
            setattr(sim.settings, k, v)
    target = sim.render(POSE0.moved((0.8, 0, -0.5), np.radians([3.0, -2.0, 1.0])))
    sim.set_loss(target, loss, mask="fan")


# CPU-f64 Simulators shared by the f64 tests of this module (every f64 check builds the same few
# configurations; a Simulator's kernels are compiled for its own fields, so building one costs
# seconds of JIT while a render at 12 x 40 costs milliseconds). Each test sets its own display
# settings, target and loss (_set_target) and restores any mapping parameter it perturbs, so the
# tests stay independent of order. Valid only while the Taichi runtime that built them lives:
# an arch switch (ti.reset) makes a new one, detected by identity.
_F64_SIMS = {}


def _sim64(kind, model="primary", requires_grad=True):
    from taichi.lang import impl

    backend.ensure("cpu", "f64")
    rt = impl.get_runtime()
    key = (kind, model, requires_grad)
    hit = _F64_SIMS.get(key)
    if hit is None or hit[0] is not rt:
        if any(r is not rt for r, _ in _F64_SIMS.values()):
            _F64_SIMS.clear()                 # fields of a finished runtime
        _F64_SIMS[key] = (rt, _sim(kind, "cpu", "f64", model, requires_grad=requires_grad))
    return _F64_SIMS[key][1]


def _fd_pose(sim, pose, h):
    """Five-point central difference (error O(h^4)), so that h can stay well above the f64
    round-off noise of the loss."""
    v = pose.as_vector()
    g = np.zeros(6)
    for i in range(6):
        e = np.zeros(6)
        e[i] = h
        f = {k: sim.loss(Pose.from_vector(v + k * e)) for k in (-2, -1, 1, 2)}
        g[i] = (8 * (f[1] - f[-1]) - (f[2] - f[-2])) / (12 * h)
    return g


@pytest.mark.parametrize("model", ["primary", "layered"])
@pytest.mark.parametrize("loss", ["mse", "ncc", "lncc", "lc2"])
def test_pose_gradient_matches_finite_differences_f64(cpu64, model, loss):
    sim = _sim64("tissue", model, requires_grad="pose")
    _set_target(sim, loss)
    if loss in ("lncc", "lc2"):
        sim.set_loss(sim.render(POSE0.moved((0.8, 0, -0.5))), loss, mask=None, patch_px=8)
    _, g = sim.value_and_grad(POSE0)
    fd = _fd_pose(sim, POSE0, 1e-6)
    # LC2 on this tiny 24 px image is ~1e-3 from a perfect fit: its f64 round-off (~3e-12) and
    # the kinks of the trilinear scatterer weights under the coherent phase leave no step with a
    # difference quotient better than 4e-4 (h = 1e-5: 4e-3, 1e-6: 4e-4, 1e-7: 4e-3); the other
    # losses check the same coherent path to 1e-5
    tol = 1e-3 if loss == "lc2" else 1e-5
    assert np.abs(g["pose"] - fd).max() <= tol * np.abs(fd).max() + 1e-12, (g["pose"], fd)


def _fd_params(sim, which, idx, h=1e-7):
    """Five-point central differences of the loss w.r.t. mapping parameters (error O(h^4):
    the MLP's first-layer weights have a large third derivative)."""
    p = sim.mapping_params()
    out = []
    for ij in idx:
        f = {}
        for k in (-2, -1, 1, 2):
            q = {key: v.copy() for key, v in p.items()}
            q[which][ij] += k * h
            sim.set_mapping_params(**{which: q[which]})
            f[k] = sim.loss(POSE0)
        out.append((8 * (f[1] - f[-1]) - (f[2] - f[-2])) / (12 * h))
    sim.set_mapping_params(**{which: p[which]})
    return np.array(out)


@pytest.mark.parametrize("kind", ["tissue", "transfer", "mlp"])
def test_mapping_gradient_matches_finite_differences_f64(cpu64, kind):
    sim = _sim64(kind)
    _set_target(sim, "mse")
    _, g = sim.value_and_grad(POSE0, wrt=("pose", "mapping"))
    key = GRAD_KEY[kind]
    idx = list(np.ndindex(*g[key].shape))
    ref = _fd_params(sim, key, idx)
    got = np.array([g[key][ij] for ij in idx])
    assert np.abs(ref).max() > 0
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max(), np.c_[got, ref]


def test_vjp_matches_loss_gradient(cpu64):
    """vjp with upstream gradient 2 (fan - target) / n equals the MSE pose gradient."""
    sim = _sim64("tissue", requires_grad="pose")
    _set_target(sim, "mse")
    target = sim.render(POSE0.moved((0.8, 0, -0.5), np.radians([3.0, -2.0, 1.0])))
    sim.set_loss(target, "mse", mask=None)
    _, g = sim.value_and_grad(POSE0)
    fan = sim.render(POSE0)
    up = 2 * (fan - target) / fan.size
    v = sim.vjp(POSE0, up)
    assert np.allclose(v["pose"], g["pose"], rtol=1e-7, atol=1e-14)   # atomics: sum order varies


# f32 vs CPU-f64 gradients, max error / max |reference| per parameter group, at four poses, for
# every mapping kind and every echo model: the bound is 1e-3 (impedances are held as deviations from
# Z_REF, so consecutive differences keep their digits in f32).
F32_POSES = [POSE0] + [POSE0.moved(d, np.radians(a)) for d, a in
                       [((1.5, -1.0, 0.5), (6, -4, 8)), ((-2.0, 1.0, 1.0), (-8, 5, -3)),
                        ((0.5, 2.0, 0.0), (3, 9, -7))]]
F32_CASES = [("tissue", "primary"), ("transfer", "primary"), ("mlp", "primary"),
             ("tissue", "layered"), ("transfer", "reverb")]
DISPLAY = dict(dynamic_range_db=60.0, gain_db=0.0)      # a realistic display chain


@pytest.fixture(scope="module")
def ref64():
    """CPU-f64 loss and gradients of every F32_CASES configuration at F32_POSES, computed once
    (before the f32 tests switch the backend) and shared by every f32 backend."""
    out = {}
    for kind, model in F32_CASES:
        sim = _sim64(kind, model)
        _set_target(sim, "ncc", **DISPLAY)
        out[kind, model] = [sim.value_and_grad(p, wrt=("pose", "mapping")) for p in F32_POSES]
    return out


@pytest.mark.parametrize("kind, model", F32_CASES)
def test_f32_gradients_match_cpu_f64(ref64, arch, kind, model):
    sim = _sim(kind, arch, "f32", model=model, loss="ncc", **DISPLAY)
    res32 = [sim.value_and_grad(p, wrt=("pose", "mapping")) for p in F32_POSES]
    for (l32, g32), (l64, g64) in zip(res32, ref64[kind, model]):
        assert abs(l32 - l64) <= 1e-4
        for key in ("pose", GRAD_KEY[kind]):
            assert np.abs(g64[key]).max() > 0
            err = np.abs(g32[key] - g64[key]).max() / np.abs(g64[key]).max()
            assert err <= 1e-3, (key, err)


def test_no_nan_over_random_poses_including_rays_leaving_the_volume(cpu32):
    sim = Simulator(_smooth_volume("tissue"), probe=PROBE, arch="cpu", requires_grad=True)
    target = sim.render(POSE0)
    sim.set_loss(target, "ncc")
    rng = np.random.default_rng(7)
    for _ in range(200):
        v = np.r_[rng.uniform(-25, 25, 3), rng.uniform(-np.pi, np.pi, 3)]
        loss, g = sim.value_and_grad(Pose.from_vector(v), wrt=("pose", "mapping"))
        assert np.isfinite(loss)
        for arr in g.values():
            assert np.all(np.isfinite(arr))


@pytest.mark.parametrize("kind, settings", [("tissue", dict()), ("transfer", dict(speckle="mean")),
                                            ("mlp", dict(speckle="off", elevation_planes=3)),
                                            ("tissue", dict(elevation_planes=3))])
def test_fused_tape_path_matches_staged_f64(cpu64, monkeypatch, kind, settings):
    """primary model under the Tape: the fused kernels with hand-written adjoints
    (tape_fused, the default) give the staged chain's values and (automatic) gradients."""
    out = []
    for fused in (True, False):
        monkeypatch.setattr(Simulator, "tape_fused", fused)
        sim = _sim(kind, "cpu", "f64", loss="ncc", **settings)
        assert sim._tape_fused is fused
        pose = POSE0.moved((0.3, -0.2, 0.1), np.radians([2.0, 1.0, -1.5]))
        v, g = sim.value_and_grad(pose, wrt=("pose", "mapping"))
        out.append((v, g, sim.bmode.to_numpy(), sim.iq_i.to_numpy()))
    (v1, g1, b1, i1), (v2, g2, b2, i2) = out
    assert abs(v1 - v2) <= 1e-13
    assert np.abs(b1 - b2).max() <= 1e-13 and np.abs(i1 - i2).max() <= 1e-13 * np.abs(i2).max()
    for key in g2:
        ref = np.abs(g2[key]).max()
        assert np.abs(g1[key] - g2[key]).max() <= 1e-12 * max(ref, 1e-30), key
