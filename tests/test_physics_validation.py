"""Physics acceptance numbers of benchmarks/validate_physics.py at smaller sizes (looser
tolerances where fewer samples make the estimate noisier): Rayleigh speckle, PSF from the set pulse
and aperture, attenuation slope, cyst contrast, two-layer reflection, reverb multiple; plus the
test objects and the probe presets."""
import math
import os
import sys

import numpy as np
import pytest

from diffus_taichi import get_probe, load_volume
from diffus_taichi.simulator import Simulator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import validate_physics as vp  # noqa: E402


def test_fully_developed_speckle_is_rayleigh(cpu32):
    r = vp.measure_speckle("cpu", n_lines=192, n_samples=512)
    # Rayleigh mean/std = 1.913; with ~1e4 correlated samples the estimate scatters by ~0.03
    assert abs(r["snr"] - vp.RAYLEIGH_SNR) <= 0.1, r["snr"]
    assert abs(r["iq_ratio"] - 1.0) < 0.06 and abs(r["iq_corr"]) < 0.06     # circular I/Q


def test_value_noise_would_not_be_rayleigh_guard(cpu32):
    """The statistic can fail: a speckle-free image (scatterer strength only) is far off."""
    r = vp.measure_speckle("cpu", n_lines=32, n_samples=128, edge=4, speckle="off")
    assert not (abs(r["snr"] - vp.RAYLEIGH_SNR) <= 0.1)


def test_mean_mode_matches_coherent_intensity(cpu32):
    r = vp.measure_mean_consistency("cpu", n_lines=64, n_samples=128)
    assert abs(r["ratio"] - 1.0) <= 0.25, r["ratio"]


def test_wire_psf_matches_pulse_and_aperture(cpu32):
    rows = vp.measure_wires("cpu")
    assert len(rows) == 3
    for w in rows:
        assert w["axial_mm"] == pytest.approx(w["axial_pred_mm"], rel=0.1), w
        assert w["lateral_mm"] == pytest.approx(w["lateral_pred_mm"], rel=0.1), w
    # depth dependence outside the focal zone: narrowest near the focus (20 mm)... and wider at 30
    assert rows[2]["lateral_mm"] > 1.5 * rows[1]["lateral_mm"]


def test_attenuation_slope_and_tgc(cpu32):
    r = vp.measure_attenuation("cpu", n_lines=64, n_samples=256)
    assert r["slope_db_cm"] == pytest.approx(r["set_db_cm"], rel=0.06)
    assert abs(r["tgc_residual_db_cm"]) < 0.3


def test_cyst_contrast_follows_echogenicity(cpu32):
    rows = {(r["tissue"], r["radius_mm"]): r for r in vp.measure_cysts("cpu", n_lines=192,
                                                                       n_samples=512)["rows"]}
    assert rows[("csf", 3.0)]["measured_db"] <= -20
    assert rows[("csf", 2.0)]["measured_db"] <= -20
    for t in ("grey_matter", "tumour"):
        r = rows[(t, 3.0)]
        assert abs(r["measured_db"] - r["predicted_db"]) <= 2.0, r


def test_two_layer_reflection_and_reverb_multiple(cpu32):
    for r in vp.measure_layers("cpu", n_samples=1024):
        assert r["echo"] == pytest.approx(r["predicted"], rel=0.01), r
    rv = vp.measure_reverb("cpu", n_samples=512)
    assert abs(rv["multiple_found_sample"] - rv["multiple_expected_sample"]) <= 2
    for key in ("primary_a", "primary_b", "multiple"):
        m, p = rv[key]
        assert m == pytest.approx(p, rel=0.02), (key, m, p)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["uniform", "wires", "cysts", "layers"])
def test_test_objects_are_builtins(name):
    v = load_volume(name)
    assert v.name == name and np.all(np.isfinite(v.channels))
    assert v.tissue_names


def test_probe_presets_are_realistic():
    for name in ("craniotomy", "linear", "phased", "convex"):
        p = get_probe(name)
        lo, hi = p.frequency_mhz * (1 - p.bandwidth / 2), p.frequency_mhz * (1 + p.bandwidth / 2)
        assert 1.0 <= lo < hi <= 20.0
        d = p.sample_depths_mm()[1:]
        el, lat = p.elevation_fwhm_mm(d), p.lateral_fwhm_mm(d)
        assert np.all(el > 0) and np.all(lat > 0)
        # pulse-echo lateral FWHM at the focus ~ lambda F# (within the dynamic-receive product)
        f = p.lateral_fwhm_mm(p.focus_mm)
        assert 0.5 * p.wavelength_mm * p.focus_mm / p.aperture_mm < f <= \
            p.wavelength_mm * p.focus_mm / p.aperture_mm * 1.001
        assert np.min(el) >= 0.5 * p.wavelength_mm            # slice thicker than a wavelength
    with pytest.raises(ValueError, match="elevation_aperture_mm"):
        get_probe("linear", elevation_aperture_mm=-1.0)


def test_elevation_planes_setting(cpu32):
    with pytest.raises(ValueError, match="elevation_planes"):
        Simulator("uniform", probe=get_probe("linear", n_lines=8, n_samples=32), arch="cpu",
                  elevation_planes=2)
    r = vp.measure_speckle("cpu", n_lines=96, n_samples=256, edge=16, elevation_planes=3)
    assert math.isfinite(r["snr"]) and abs(r["snr"] - vp.RAYLEIGH_SNR) <= 0.15
