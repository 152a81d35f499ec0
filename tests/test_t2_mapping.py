"""Default T2 mapping (issue 5): the knot table against the tissue table it cites, the MLP start
that reproduces the non-monotone curve, the sign of the echo at a white-matter/CSF boundary in
a render of a T2-like volume, agreement with the tissue model on the built-in brain's synthetic
T2, ``auto`` picking it for T2 volumes (ReMIND2Reg 0002, BIDS *_T2w, meta), files and bad use."""
import numpy as np
import pytest

from diffus_taichi import Pose, Volume, get_probe, load_volume, remind
from diffus_taichi.acoustics import (T1_TRANSFER_KNOTS, T2_MLP_KNOTS, AcousticMapping, TissueTable,
                                     get_mapping, mri_contrast, t1_mapping, t2_mapping)
from diffus_taichi.mlp_mapping import MLPParams
from diffus_taichi.simulator import Simulator
from diffus_taichi.volume import load_nifti, normalise_intensity

# the tissue row each knot cites (acoustics.T2_MLP_KNOTS comments)
KNOT_TISSUES = ("water", "blood", "white_matter", "white_matter", "grey_matter", "grey_matter",
                "tumour", "resection_cavity", "csf")
# T2 intensities of the synthetic T2 (remind.T2_WEIGHTS) on the built-in brain, normalised
WM_T2, GM_T2, CSF_T2 = 0.36, 0.56, 1.0
# stated tolerances of the MLP start at the knots (measured 0.0002 MRayl, 0.0017 dB/cm/MHz, 0.0011)
TOL_KNOTS = np.array([0.001, 0.005, 0.005])


def _knot_x():
    return np.linspace(0.0, 1.0, len(T2_MLP_KNOTS))


def _small(name="t2ish", meta=None, channels=("intensity",)):
    data = np.full((4, 4, 4, len(channels)), 0.5, np.float32)
    return Volume(data, np.eye(4), channels, name=name, meta=dict(meta or {}))


def test_t2_knots_cite_the_tissue_table_and_are_not_monotone():
    tab = TissueTable.load()
    assert T2_MLP_KNOTS.shape == (len(KNOT_TISSUES), 3)
    for row, name in zip(T2_MLP_KNOTS, KNOT_TISSUES):
        np.testing.assert_allclose(row, tab[name].props(), rtol=0, atol=1e-12, err_msg=name)
    z = T2_MLP_KNOTS[:, 0]
    assert np.any(np.diff(z) > 0.1) and np.any(np.diff(z) < -0.1)      # not monotone
    # T2 order: CSF brightest with the lowest tissue impedance; white matter darker but higher
    x = _knot_x()
    assert np.interp(CSF_T2, x, z) < np.interp(GM_T2, x, z) < np.interp(WM_T2, x, z)
    # the monotone transfer kind refuses it and says what to use instead
    with pytest.raises(ValueError, match=r"monotone.*'mlp'.*'t2'"):
        AcousticMapping("transfer", knots=T2_MLP_KNOTS)


def test_t2_mlp_starts_at_the_knot_curve():
    m = get_mapping("t2", _small())
    assert m.kind == "mlp" and m.mlp.features == ("intensity",) and m.mlp.hidden == (32,)
    t, props = m.mlp.curve(len(T2_MLP_KNOTS))
    err = np.abs(props - T2_MLP_KNOTS).max(0)
    assert np.all(err <= TOL_KNOTS), err
    # between knots the curve stays within each segment's range (no wiggles that would make
    # echoes inside one tissue): 0.002 MRayl, 0.02 dB/cm/MHz, 0.005
    t, dense = m.mlp.curve(801)
    k = len(T2_MLP_KNOTS) - 1
    seg = np.minimum((t * k).astype(int), k - 1)
    lo = np.minimum(T2_MLP_KNOTS[seg], T2_MLP_KNOTS[seg + 1])
    hi = np.maximum(T2_MLP_KNOTS[seg], T2_MLP_KNOTS[seg + 1])
    over = np.maximum(dense - hi, lo - dense).clip(0).max(0)
    assert np.all(over <= [0.002, 0.02, 0.005]), over
    dz = np.diff(dense[:, 0])                                      # the MLP is non-monotone too:
    assert dz.clip(0).sum() > 0.15 and dz.clip(None, 0).sum() < -0.15   # it rises and falls
    z = m.mlp.props(np.array([[CSF_T2], [GM_T2], [WM_T2]]))[:, 0]
    assert z[0] < z[1] < z[2]
    assert z[2] - z[0] > 0.09                                      # 1.622 - 1.521 MRayl
    # explicit alias for T1, case-insensitive names, and the plain MLP still starts at T1
    t1 = get_mapping("T1", _small())
    assert t1.kind == "transfer" and np.array_equal(t1.knots, T1_TRANSFER_KNOTS)
    assert np.array_equal(get_mapping(" T2 ", _small()).mlp.weights, m.mlp.weights)
    assert np.abs(MLPParams().curve(5)[1] - T1_TRANSFER_KNOTS).max() < 0.02


def test_render_of_a_t2_volume_gives_negative_echo_from_white_matter_into_csf(cpu32):
    """Slabs along the beam: white matter (T2 0.36) | CSF (1.0) | grey matter (0.56); the
    interface echo (echo / two-way gain summed over the 1-voxel interface) must equal the
    reflection coefficient of the mapped impedances: negative going from white matter into CSF,
    positive from CSF into grey matter. The T1 curve on the same T2 volume gets the sign wrong."""
    nz = 40
    depth_vox = np.arange(nz)[::-1]                     # voxel z index -> depth below the top
    col = np.where(depth_vox < 15, WM_T2, np.where(depth_vox < 25, CSF_T2, GM_T2))
    vol = Volume.from_array(np.broadcast_to(col, (12, 12, nz)).copy(), spacing_mm=1.0,
                            normalise=False, name="slabs_T2w")
    assert mri_contrast(vol) == "T2"                    # BIDS-like name: auto = the T2 curve
    top = vol.voxel_to_world([5.5, 5.5, nz - 1])
    pose = Pose.look_at(top + [0.0, 0.0, 0.5], (0, 0, -1), (1, 0, 0))
    probe = get_probe("linear", width_mm=4.0, n_lines=4, depth_mm=32.0, n_samples=256,
                      image_px=(32, 32))
    depth = probe.sample_depths_mm()
    z = {}
    r = {}
    for spec in ("auto", "t1"):
        sim = Simulator(vol, probe=probe, mapping=spec, arch="cpu", speckle=False,
                        tgc_db_per_cm=0.0)
        assert sim.mapping.kind == ("mlp" if spec == "auto" else "transfer")
        sim.render(pose)
        st = sim.stages()
        zz = st["impedance_MRayl"][1]
        bands = ((8, 13), (18, 23), (28, 31))           # mm: inside each slab
        z[spec] = [np.median(zz[(depth > a) & (depth < b)]) for a, b in bands]
        ratio = st["echo"][1] / st["two_way_gain"][1]
        r[spec] = [float(ratio[np.abs(depth - d) < 1.5].sum()) for d in (15.0, 25.0)]
    wm, csf, gm = z["auto"]
    np.testing.assert_allclose([wm, csf, gm], [1.622, 1.521, 1.615], atol=0.002)   # f32 kernel
    pred = [(csf - wm) / (csf + wm), (gm - csf) / (gm + csf)]
    assert r["auto"][0] < -0.025 and r["auto"][1] > 0.025, r["auto"]
    np.testing.assert_allclose(r["auto"], pred, rtol=0.01)
    # the T1 transfer function reads bright CSF as dense tissue: both signs flip
    assert r["t1"][0] > 0 and r["t1"][1] < 0, r["t1"]


def test_t2_curve_matches_the_tissue_model_on_the_brain():
    """Synthetic T2 of the built-in brain (remind.T2_WEIGHTS of its tissue fractions) through
    the T2 mapping vs the tissue model's impedance of the same voxels (every 3rd voxel)."""
    b = load_volume("brain")
    sl = (slice(None, None, 3),) * 3
    t2 = sum(w * b.channel(n) for n, w in remind.T2_WEIGHTS.items() if n in b.channel_names)
    t2 = normalise_intensity(np.asarray(t2, np.float32))[sl]
    tab = TissueTable.load()
    fr = {n: b.channel(n)[sl].astype(np.float64) for n in ("grey_matter", "white_matter", "csf")}
    zw = tab["water"].impedance_MRayl
    z_true = zw + sum(f * (tab[n].impedance_MRayl - zw) for n, f in fr.items())
    brain = sum(fr.values()) > 0.9
    pure = np.maximum.reduce(list(fr.values())) > 0.98
    z_t2 = t2_mapping().mlp.props(t2[brain][:, None].astype(np.float64))[:, 0]
    z_t1 = np.interp(t2[brain], np.linspace(0, 1, len(T1_TRANSFER_KNOTS)), T1_TRANSFER_KNOTS[:, 0])
    zt = z_true[brain]
    # pure tissue: exact up to the MLP fit (measured 0.0005 MRayl)
    assert np.abs(z_t2 - zt)[pure[brain]].mean() < 0.002
    # all brain voxels (partial volumes of CSF and grey matter cross the tumour knot at 0.75:
    # measured correlation 0.87); the T1 curve on T2 data is anti-correlated (measured -0.76)
    assert np.corrcoef(z_t2, zt)[0, 1] > 0.8
    assert np.corrcoef(z_t1, zt)[0, 1] < -0.5


def test_auto_picks_t2_for_t2_volumes(tmp_path):
    ref = t2_mapping().mlp.weights
    for name, meta, kind in [("sub-01_T2w.nii.gz", {}, "mlp"),
                             ("sub-01_T1w.nii.gz", {}, "transfer"),
                             ("sub-01_FLAIR.nii.gz", {}, "transfer"),
                             ("x", {"contrast": "T2"}, "mlp"),
                             ("x", {"contrast": "t2w"}, "mlp"),
                             ("sub-01_T2w", {"contrast": "FLAIR"}, "transfer"),   # explicit wins
                             ("x", {"path": "/d/ReMIND2Reg_0007_0002.nii.gz"}, "mlp"),
                             ("x", {"path": "/d/ReMIND2Reg_0007_0001.nii.gz"}, "transfer"),
                             ("x", {"case": "0007", "modality": "0002"}, "mlp")]:
        m = get_mapping("auto", _small(name, meta))
        assert m.kind == kind, (name, meta, m.kind)
        if kind == "mlp":
            assert np.array_equal(m.mlp.weights, ref)
    # tissue-fraction channels still win
    tissue = _small("sub-01_T2w", {}, ("grey_matter",))
    assert get_mapping("auto", tissue).kind == "tissue"
    # the real hook: RemindCase.load stores the modality; a plain NIfTI load keeps the file name
    remind.make_synthetic_case(str(tmp_path), "0000", size_mm=24.0, spacing_mm=3.0, with_us=False)
    case = remind.open_case(str(tmp_path), "0000")
    t2, t1 = case.load_mri("T2"), case.load_mri("ceT1")
    assert mri_contrast(t2) == "T2" and mri_contrast(t1) == "T1"
    assert get_mapping("auto", t2).kind == "mlp" and get_mapping(None, t1).kind == "transfer"
    plain = load_nifti(case.path("T2"))
    assert "modality" not in plain.meta and get_mapping("auto", plain).kind == "mlp"


def test_t2_mapping_file_roundtrip_and_bad_use(tmp_path):
    m = t2_mapping(hidden=(8,), seed=2)
    path = tmp_path / "t2.json"
    m.save(str(path))
    back = get_mapping(str(path), _small())
    assert back.kind == "mlp" and np.array_equal(back.mlp.weights, m.mlp.weights)
    assert t1_mapping().kind == "transfer"
    tissue_only = _small("gm", {}, ("grey_matter",))
    for spec in ("t2", "t1"):
        with pytest.raises(ValueError, match=r"needs an intensity channel.*'tissue'"):
            get_mapping(spec, tissue_only)
    with pytest.raises(ValueError, match=r"unknown mapping 't3'.*t1, t2"):
        get_mapping("t3", _small())
    with pytest.raises(ValueError, match="shape"):
        t2_mapping(knots=[[1.5, 0.0, 0.0]])
    with pytest.raises(ValueError, match="impedance"):
        t2_mapping(knots=[[1.5, 0.0, 0.0], [-1.6, 0.5, 0.1]])
    with pytest.raises(ValueError, match="attenuation"):
        t2_mapping(knots=[[1.5, 0.0, 0.0], [1.6, np.nan, 0.1]])
    with pytest.raises(ValueError, match="array of numbers"):
        MLPParams(init_knots=[["a", "b", "c"], [1.6, 0.5, 0.1]])
    with pytest.raises(ValueError, match="knot_weight"):
        t2_mapping(knot_weight=-1.0)
    with pytest.raises(ValueError, match="hidden"):
        t2_mapping(hidden=(0,))
