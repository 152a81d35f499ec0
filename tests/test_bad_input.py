"""Bad input -> a clear error naming the problem (never a crash or a hang); one test per case.

Every test asserts the exception type and a fragment of its message. Inputs are built in
``tmp_path``; only the CPU backend is used and every Simulator is tiny.
"""
import csv
import gzip
import logging
import os
import re

import nibabel as nib
import numpy as np
import pytest

from diffus_taichi import (AcousticMapping, Pose, TissueTable, Volume, backend, get_mapping,
                           get_probe, load_nifti, load_volume)
from diffus_taichi.acoustics import TISSUE_CSV
from diffus_taichi.probe import MAX_LINES, MAX_SAMPLES, Probe

SMALL_PROBE = dict(n_lines=32, n_samples=64, image_px=(64, 64))


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _save_nifti(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return str(path)


def _random_volume_data(shape=(16, 16, 16), seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _small_volume(n=32, seed=0):
    return Volume.from_array(np.random.default_rng(seed).random((n, n, n)), spacing_mm=1.0)


def _tissue_csv_with(tmp_path, tissue, impedance):
    """Copy of assets/tissues.csv with one tissue's impedance replaced."""
    with open(TISSUE_CSV, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames
        rows = list(reader)
    assert any(r["name"] == tissue for r in rows)
    for r in rows:
        if r["name"] == tissue:
            r["impedance_MRayl"] = str(impedance)
    out = tmp_path / f"tissues_{tissue}_{impedance}.csv"
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return str(out)


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def test_missing_file_names_the_path():
    with pytest.raises(FileNotFoundError, match=re.escape("/nonexistent.nii.gz")):
        load_volume("/nonexistent.nii.gz")


def test_missing_file_via_load_nifti_names_the_path(tmp_path):
    p = str(tmp_path / "nope.nii")
    with pytest.raises(FileNotFoundError, match=re.escape(p)):
        load_nifti(p)


def test_directory_instead_of_file(tmp_path):
    d = tmp_path / "dir.nii.gz"
    d.mkdir()
    with pytest.raises(ValueError, match="directory"):
        load_volume(str(d))


def test_text_file_named_nii_gz_is_not_nifti(tmp_path):
    p = tmp_path / "x.nii.gz"
    p.write_text("this is not a NIfTI file\n" * 20)
    with pytest.raises(ValueError, match="NIfTI"):
        load_volume(str(p))


def test_text_file_named_nii_is_not_nifti(tmp_path):
    p = tmp_path / "x.nii"
    p.write_text("this is not a NIfTI file either\n" * 40)
    with pytest.raises(ValueError, match="NIfTI"):
        load_volume(str(p))


def test_truncated_gzip_fails_cleanly(tmp_path):
    good = _save_nifti(tmp_path / "good.nii.gz", _random_volume_data())
    raw = open(good, "rb").read()
    bad = tmp_path / "trunc.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_volume(str(bad))


def test_gzip_with_flipped_bytes_after_header_fails_cleanly(tmp_path):
    """A flipped byte in the compressed stream usually still inflates, to wrong voxels; only the
    gzip CRC catches it. The loader must not return silently corrupted data."""
    good = _save_nifti(tmp_path / "good.nii.gz", _random_volume_data())
    raw = bytearray(open(good, "rb").read())
    pos = len(raw) // 2                       # well after the 348-byte header (compressed)
    raw[pos] ^= 0xFF
    bad = tmp_path / "flipped.nii.gz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(gzip.BadGzipFile):    # sanity: the file really is corrupt
        gzip.decompress(bytes(raw))
    with pytest.raises(ValueError, match=r"(?i)corrupt|truncated|crc"):
        load_volume(str(bad))


def test_truncated_uncompressed_nii_fails_cleanly(tmp_path):
    good = _save_nifti(tmp_path / "good.nii", _random_volume_data())
    raw = open(good, "rb").read()
    bad = tmp_path / "trunc.nii"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_volume(str(bad))


def test_4d_with_several_volumes_is_refused(tmp_path):
    p = _save_nifti(tmp_path / "four.nii.gz", _random_volume_data((8, 8, 8, 3)))
    with pytest.raises(ValueError, match="4-D"):
        load_volume(p)


def test_4d_with_one_volume_loads_squeezed(tmp_path):
    data = _random_volume_data((8, 9, 10, 1))
    p = _save_nifti(tmp_path / "one.nii.gz", data)
    vol = load_volume(p)
    assert vol.shape == (8, 9, 10)
    assert vol.channel_names == ("intensity",)
    assert np.all(np.isfinite(vol.channels))


def test_from_array_4d_with_several_volumes_is_refused():
    with pytest.raises(ValueError, match="4-D"):
        Volume.from_array(np.zeros((4, 4, 4, 2)))


def test_2d_nifti_is_refused(tmp_path):
    p = _save_nifti(tmp_path / "flat.nii.gz", _random_volume_data((16, 16)))
    with pytest.raises(ValueError, match="3-D"):
        load_volume(p)


def test_empty_array_is_refused():
    with pytest.raises(ValueError, match="empty"):
        Volume.from_array(np.zeros((0, 4, 4)))


def test_empty_nifti_is_refused(tmp_path):
    p = _save_nifti(tmp_path / "empty.nii.gz", np.zeros((0, 4, 4), np.float32))
    with pytest.raises(ValueError, match="empty"):
        load_volume(p)


def test_too_thin_volume_is_refused():
    with pytest.raises(ValueError, match="at least"):
        Volume.from_array(np.ones((1, 8, 8)))


def test_all_nan_nifti_is_refused(tmp_path):
    p = _save_nifti(tmp_path / "nan.nii.gz", np.full((8, 8, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        load_volume(p)


def test_all_nan_array_is_refused():
    with pytest.raises(ValueError, match="NaN"):
        Volume.from_array(np.full((8, 8, 8), np.nan))


def test_partly_nan_nifti_loads_with_warning(tmp_path, caplog):
    data = _random_volume_data((8, 8, 8))
    data[2:4, 3, 5] = np.nan
    data[0, 0, 0] = np.inf
    p = _save_nifti(tmp_path / "partnan.nii.gz", data)
    with caplog.at_level(logging.WARNING):
        vol = load_volume(p)
    assert any("NaN" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert np.all(np.isfinite(vol.channels))
    assert vol.shape == (8, 8, 8)


def test_absurd_shape_in_header_is_refused_before_reading(tmp_path):
    """Header says 4096^3 voxels but the file holds a few bytes: refuse on shape, read nothing."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4096, 4096, 4096))
    hdr.set_data_dtype(np.uint8)
    p = tmp_path / "huge.nii"
    with open(p, "wb") as fh:
        hdr.write_to(fh)
        fh.write(b"\0" * max(0, int(hdr["vox_offset"]) - fh.tell()))
        fh.write(b"\0" * 64)
    assert os.path.getsize(p) < 1000
    with pytest.raises(ValueError, match=r"(?i)absurd|large"):
        load_volume(str(p))


# --------------------------------------------------------------------------------------------
# acoustic mapping
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impedance", [0, -1])
def test_non_positive_impedance_in_tissue_table(tmp_path, impedance):
    path = _tissue_csv_with(tmp_path, "water", impedance)
    with pytest.raises(ValueError, match=r"'water'.*impedance"):
        TissueTable.load(path)


def test_non_positive_impedance_via_acoustic_mapping(tmp_path):
    path = _tissue_csv_with(tmp_path, "water", 0)
    with pytest.raises(ValueError, match=r"'water'.*impedance"):
        AcousticMapping(kind="tissue", table=TissueTable.load(path))


def test_non_positive_impedance_in_mapping_override():
    with pytest.raises(ValueError, match=r"'grey_matter'.*impedance"):
        AcousticMapping(kind="tissue", overrides={"grey_matter": (-1.0, 0.5, 0.1)})


def test_non_positive_impedance_in_transfer_knots():
    knots = [[0.0, 0.1, 0.0], [1.6, 0.5, 0.1]]
    with pytest.raises(ValueError, match="impedance"):
        AcousticMapping(kind="transfer", knots=knots)


def test_non_monotone_transfer_knots():
    knots = [[1.5, 0.0, 0.0], [1.7, 0.5, 0.1], [1.6, 0.8, 0.2]]
    with pytest.raises(ValueError, match="monotone"):
        AcousticMapping(kind="transfer", knots=knots)


def test_transfer_knots_of_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        AcousticMapping(kind="transfer", knots=[[1.5, 0.0, 0.0]])


def test_missing_tissue_table_file(tmp_path):
    p = str(tmp_path / "no_such_table.csv")
    with pytest.raises(FileNotFoundError, match=re.escape(p)):
        TissueTable.load(p)


def test_tissue_table_with_non_numeric_value(tmp_path):
    path = _tissue_csv_with(tmp_path, "csf", "abc")
    with pytest.raises(ValueError, match="bad row"):
        TissueTable.load(path)


def test_tissue_channel_missing_from_table():
    vol = Volume(np.ones((4, 4, 4, 1), np.float32), np.eye(4), ("unobtainium",), name="odd")
    with pytest.raises(ValueError, match="unobtainium"):
        get_mapping("tissue", vol)


def test_transfer_mapping_without_intensity_channel():
    vol = Volume(np.ones((4, 4, 4, 1), np.float32), np.eye(4), ("grey_matter",), name="gm")
    with pytest.raises(ValueError, match="intensity"):
        get_mapping("transfer", vol)


# --------------------------------------------------------------------------------------------
# probe outside the volume
# --------------------------------------------------------------------------------------------
def test_probe_entirely_outside_volume_warns_and_renders_zero(cpu32, caplog):
    from diffus_taichi.simulator import Simulator

    sim = Simulator(_small_volume(), probe=get_probe("linear", **SMALL_PROBE), arch="cpu")
    far = Pose.look_at((1000.0, 0.0, 0.0), (0, 0, -1), (1, 0, 0))
    with caplog.at_level(logging.WARNING):
        img = sim.render(far)
    assert any("outside" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert img.shape == (64, 64)
    assert np.all(np.isfinite(img))
    assert np.all(img == 0.0)


# --------------------------------------------------------------------------------------------
# probe settings: zero, negative and absurd sizes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, setting, value", [
    ("craniotomy", "n_lines", 0),
    ("craniotomy", "n_lines", -3),
    ("craniotomy", "n_samples", -5),
    ("craniotomy", "n_samples", 0),
    ("craniotomy", "depth_mm", 0),
    ("craniotomy", "depth_mm", -10.0),
    ("craniotomy", "fov_deg", -10),
    ("craniotomy", "fov_deg", 0),
    ("linear", "width_mm", 0),
    ("linear", "width_mm", -5.0),
    ("craniotomy", "image_px", (0, 10)),
    ("craniotomy", "image_px", (64, -1)),
    ("craniotomy", "frequency_mhz", 0),
    ("craniotomy", "radius_mm", -1.0),
])
def test_zero_or_negative_probe_setting_is_named(preset, setting, value):
    with pytest.raises(ValueError, match=setting):
        get_probe(preset, **{setting: value})


@pytest.mark.parametrize("setting, value", [
    ("n_samples", 10 ** 6),
    ("n_lines", 10 ** 6),
    ("depth_mm", 1e6),
    ("fov_deg", 270.0),
    ("image_px", (10 ** 6, 10 ** 6)),
    ("frequency_mhz", 1e4),
])
def test_absurd_probe_setting_is_named(setting, value):
    with pytest.raises(ValueError, match=setting):
        get_probe("craniotomy", **{setting: value})


def test_absurd_lines_times_samples():
    assert MAX_LINES * MAX_SAMPLES > (1 << 24)
    with pytest.raises(ValueError, match=r"n_lines\*n_samples"):
        get_probe("craniotomy", n_lines=MAX_LINES, n_samples=MAX_SAMPLES)


def test_non_integer_line_count():
    with pytest.raises(ValueError, match="n_lines"):
        get_probe("craniotomy", n_lines=32.5)


def test_nan_probe_setting():
    with pytest.raises(ValueError, match="depth_mm"):
        get_probe("craniotomy", depth_mm=float("nan"))


# --------------------------------------------------------------------------------------------
# poses
# --------------------------------------------------------------------------------------------
def test_pose_with_three_numbers():
    with pytest.raises(ValueError, match="6 numbers"):
        Pose.parse("1,2,3")


def test_pose_with_non_numbers():
    with pytest.raises(ValueError, match="tx,ty,tz,rx,ry,rz"):
        Pose.parse("a,b,c,d,e,f")


def test_pose_with_nan():
    with pytest.raises(ValueError, match="NaN"):
        Pose.parse("nan,0,0,0,0,0")


def test_pose_with_inf_rotation():
    with pytest.raises(ValueError, match="NaN or Inf"):
        Pose.parse("0,0,0,0,inf,0")


def test_pose_vector_with_nan():
    with pytest.raises(ValueError, match="NaN"):
        Pose.from_vector([0, 0, 0, np.nan, 0, 0])


def test_pose_file_not_a_rotation(tmp_path):
    M = np.eye(4)
    M[:3, :3] = [[2.0, 0, 0], [0, 1, 0], [0, 0, 1]]   # scaling
    p = tmp_path / "scaled.txt"
    np.savetxt(p, M)
    with pytest.raises(ValueError, match="not a rotation"):
        Pose.parse(str(p))


def test_pose_file_reflection_is_not_a_rotation(tmp_path):
    M = np.diag([1.0, 1.0, -1.0, 1.0])                # orthonormal, det -1
    p = tmp_path / "mirror.npy"
    np.save(p, M)
    with pytest.raises(ValueError, match="not a rotation"):
        Pose.parse(str(p))


def test_pose_file_with_nan(tmp_path):
    M = np.eye(4)
    M[0, 0] = np.nan
    p = tmp_path / "nan.txt"
    np.savetxt(p, M)
    with pytest.raises(ValueError, match="NaN"):
        Pose.parse(str(p))


def test_pose_file_with_nan_translation(tmp_path):
    M = np.eye(4)
    M[1, 3] = np.nan
    p = tmp_path / "nan_t.txt"
    np.savetxt(p, M)
    with pytest.raises(ValueError, match="NaN"):
        Pose.parse(str(p))


def test_pose_file_wrong_shape(tmp_path):
    p = tmp_path / "three.txt"
    np.savetxt(p, np.eye(3))
    with pytest.raises(ValueError, match="4x4"):
        Pose.parse(str(p))


def test_pose_file_bad_last_row(tmp_path):
    M = np.eye(4)
    M[3, 0] = 1.0
    p = tmp_path / "proj.txt"
    np.savetxt(p, M)
    with pytest.raises(ValueError, match="last row"):
        Pose.parse(str(p))


def test_pose_file_unreadable(tmp_path):
    p = tmp_path / "garbage.txt"
    p.write_text("not a matrix\n1 2\n")
    with pytest.raises(ValueError, match="4x4"):
        Pose.parse(str(p))


def test_look_at_parallel_hint():
    with pytest.raises(ValueError, match="parallel"):
        Pose.look_at((0, 0, 0), (0, 0, -1), (0, 0, 2))


# --------------------------------------------------------------------------------------------
# unknown names
# --------------------------------------------------------------------------------------------
def test_unknown_builtin_volume_lists_builtins():
    with pytest.raises(FileNotFoundError, match=r"no_such_volume.*built-in.*phantom"):
        load_volume("no_such_volume")


def test_volume_of_wrong_type():
    with pytest.raises(TypeError, match="volume"):
        load_volume(42)


def test_unknown_probe_preset():
    with pytest.raises(ValueError, match=r"unknown probe preset 'nope'.*craniotomy"):
        get_probe("nope")


def test_unknown_probe_kind():
    with pytest.raises(ValueError, match="probe kind"):
        Probe(kind="annular")


def test_unknown_echo_model():
    from diffus_taichi.simulator import Simulator

    with pytest.raises(ValueError, match=r"echo_model.*'bounce'"):
        Simulator(_small_volume(8), probe=get_probe("linear", **SMALL_PROBE), echo_model="bounce",
                  arch="cpu")


def test_unknown_mapping_name():
    with pytest.raises(ValueError, match=r"unknown mapping 'magic'"):
        get_mapping("magic", _small_volume(8))


def test_unknown_mapping_kind():
    with pytest.raises(ValueError, match="mapping kind"):
        AcousticMapping(kind="magic")


def test_missing_mapping_file(tmp_path):
    p = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match=re.escape(p)):
        get_mapping(p, _small_volume(8))


def test_mapping_file_not_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        get_mapping(str(p), _small_volume(8))


def test_unknown_arch():
    with pytest.raises(ValueError, match=r"unknown arch 'metal'"):
        backend.resolve_arch("metal")


def test_unknown_precision(cpu32):
    with pytest.raises(ValueError, match="precision"):
        backend.init("cpu", "f16")


def test_bad_imaging_setting():
    from diffus_taichi.simulator import Simulator

    with pytest.raises(ValueError, match="dynamic_range_db"):
        Simulator(_small_volume(8), probe=get_probe("linear", **SMALL_PROBE), arch="cpu",
                  dynamic_range_db=0.0)


# --------------------------------------------------------------------------------------------
# layered_returns, arch 'gpu'
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("z", [[1.5, 0.0, 1.6], [1.5, -1.6], [[1.5, 1.6], [1.5, np.nan]]])
def test_layered_returns_non_positive_impedance(z):
    from diffus_taichi.echo import layered_returns

    with pytest.raises(ValueError, match="impedance"):
        layered_returns(z)


def test_layered_returns_too_short():
    from diffus_taichi.echo import layered_returns

    with pytest.raises(ValueError, match="shape"):
        layered_returns([1.5])


@pytest.mark.parametrize("name", ["gpu", "GPU"])
def test_arch_gpu_is_refused(name):
    with pytest.raises(ValueError, match="gpu"):
        backend.resolve_arch(name)


def test_arch_gpu_from_environment_is_refused(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match="gpu"):
        backend.resolve_arch(None)


def test_arch_opengl_is_not_probed():
    # unknown to the package: refused by name, before any driver probe (which can segfault)
    with pytest.raises(ValueError, match="opengl"):
        backend.arch_supported("opengl")


def test_simulator_arch_gpu_is_refused():
    from diffus_taichi.simulator import Simulator

    with pytest.raises(ValueError, match="gpu"):
        Simulator(_small_volume(8), probe=get_probe("linear", **SMALL_PROBE), arch="gpu")
