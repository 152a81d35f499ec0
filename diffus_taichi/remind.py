"""ReMIND2Reg cases: open a dataset folder or its dataset JSON, list cases, load the MRI(s) and
the 3-D intra-operative ultrasound with their affines; build synthetic cases in the same layout.

Layout (Learn2Reg ReMIND2Reg 2.1): ``imagesTr/ReMIND2Reg_<case>_<modality>.nii.gz`` with modality
``0000`` = 3-D ultrasound (fixed), ``0001`` = ceT1 MRI, ``0002`` = T2 MRI (moving), every image
resampled into the MRI's space (256^3 at 0.5 mm). The dataset JSON lists ``training`` (one entry
per image), ``training_paired_images`` and ``registration_val`` (``fixed``/``moving`` pairs).
Not every case has both MRIs.

    ds = RemindDataset.open("ReMIND2Reg/")        # folder, imagesTr/ or the dataset JSON
    ds.case_ids()                                 # ['0000', '0001', ...]
    case = ds.case("0042")
    us = case.load_us()                           # Volume, world mm from the NIfTI affine
    mri = case.load_mri("ceT1")                   # or "T2"; clear error if the case lacks it

Synthetic cases (:func:`make_synthetic_case`) are cut from the built-in brain: ``0001`` its T1,
``0002`` a T2-like contrast from the tissue fractions, ``0000`` a compounded tracked sweep of
simulated B-mode frames (:mod:`diffus_taichi.sweep`), all on one grid with one affine.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field

import numpy as np

from .pose import Pose
from .volume import Volume, load_nifti

log = logging.getLogger(__name__)

US, CET1, T2 = "0000", "0001", "0002"
MODALITY_NAMES = {US: "3-D ultrasound", CET1: "ceT1 MRI", T2: "T2 MRI"}
MRI_MODALITIES = (CET1, T2)
_ALIASES = {"us": US, "ultrasound": US, "0": US, "cet1": CET1, "t1": CET1, "1": CET1,
            "t2": T2, "2": T2}
FILE_RE = re.compile(r"^ReMIND2Reg_(\d{4})_(\d{4})\.nii(\.gz)?$")
INDEX_NAMES = ("ReMIND2Reg_dataset.json", "dataset.json")
SYNTHETIC_DIR = "synthetic"      # extra files of synthetic cases (sweep poses); not in real data


def modality_code(spec) -> str:
    """'0001' from '0001', 'ceT1', 't1', 1 ...; ValueError for anything else."""
    s = str(spec).strip().lower()
    if s in MODALITY_NAMES:
        return s
    if s in _ALIASES:
        return _ALIASES[s]
    raise ValueError(f"unknown ReMIND2Reg modality {spec!r}: use 0000/us, 0001/ceT1 or 0002/T2")


def image_name(case_id: str, modality: str) -> str:
    return f"ReMIND2Reg_{case_id}_{modality_code(modality)}.nii.gz"


@dataclass
class RemindCase:
    """One case: ``files`` maps modality code -> absolute path (as listed; may not exist)."""

    case_id: str
    files: dict = field(default_factory=dict)
    root: str = "."

    @property
    def modalities(self) -> tuple:
        return tuple(sorted(self.files))

    @property
    def mri_modalities(self) -> tuple:
        return tuple(m for m in MRI_MODALITIES if m in self.files)

    def has(self, modality) -> bool:
        return modality_code(modality) in self.files

    def describe(self) -> str:
        return ", ".join(f"{MODALITY_NAMES.get(m, m)} ({m})" for m in self.modalities) or "nothing"

    def path(self, modality) -> str:
        """Path of one modality; ValueError naming the case and what it has if it is absent."""
        m = modality_code(modality)
        if m not in self.files:
            raise ValueError(f"ReMIND2Reg case {self.case_id} has no {MODALITY_NAMES[m]} ({m}); "
                             f"it has: {self.describe()}")
        p = self.files[m]
        if not os.path.exists(p):
            raise FileNotFoundError(f"ReMIND2Reg case {self.case_id}: {MODALITY_NAMES[m]} file "
                                    f"{p!r} is listed but missing on disk")
        return p

    def load(self, modality) -> Volume:
        """The image of one modality as an intensity Volume (affine kept, intensity normalised to
        [0, 1]); a corrupt file raises ValueError naming the file."""
        m = modality_code(modality)
        p = self.path(m)
        try:
            vol = load_nifti(p, name=f"ReMIND2Reg_{self.case_id}_{m}")
        except ValueError as e:
            raise ValueError(f"ReMIND2Reg case {self.case_id}, {MODALITY_NAMES[m]}: {e}") from None
        vol.meta.update(case=self.case_id, modality=m)
        if m == US:
            _us_display_scale(vol, p)
        return vol

    def load_us(self) -> Volume:
        return self.load(US)

    def load_mri(self, modality=None) -> Volume:
        """An MRI: ``modality`` ('ceT1'/'0001' or 'T2'/'0002'); None = ceT1 if present, else T2."""
        if modality is None:
            if not self.mri_modalities:
                raise ValueError(f"ReMIND2Reg case {self.case_id} has no MRI (0001 ceT1 or 0002 "
                                 f"T2); it has: {self.describe()}")
            modality = self.mri_modalities[0]
        m = modality_code(modality)
        if m not in MRI_MODALITIES:
            raise ValueError(f"{modality!r} is not an MRI modality (0001 ceT1, 0002 T2)")
        return self.load(m)

    def load_mris(self) -> dict:
        """{modality code: Volume} of every MRI the case has."""
        return {m: self.load(m) for m in self.mri_modalities}

    def sweep_poses(self) -> list | None:
        """Probe poses of the sweep that made a synthetic case's ultrasound (None for real data)."""
        p = os.path.join(self.root, SYNTHETIC_DIR, f"ReMIND2Reg_{self.case_id}_sweep.json")
        if not os.path.exists(p):
            return None
        with open(p) as fh:
            return [Pose.from_vector(v) for v in json.load(fh)["poses_mm_rad"]]


class RemindDataset:
    """A ReMIND2Reg folder (with ``imagesTr/``) or dataset JSON.

    ``cases``: {case id: :class:`RemindCase`}; ``pairs``: training (fixed, moving) modality
    pairs per case; ``registration_val``: the validation pairs; ``index``: the parsed JSON or None.
    """

    def __init__(self, root: str, cases: dict, index: dict | None = None, pairs=(), val=()):
        self.root, self.cases, self.index = root, cases, index
        self.pairs, self.registration_val = list(pairs), list(val)

    @classmethod
    def open(cls, path) -> "RemindDataset":
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"ReMIND2Reg dataset not found: {path!r}")
        if os.path.isfile(path):
            if not path.endswith(".json"):
                m = FILE_RE.match(os.path.basename(path))
                if not m:
                    raise ValueError(f"{path!r} is neither a ReMIND2Reg folder, a dataset JSON nor "
                                     "a ReMIND2Reg_<case>_<modality>.nii.gz image")
                ds = cls._scan(os.path.dirname(os.path.abspath(path)))
                return cls(ds.root, {m.group(1): ds.cases[m.group(1)]})
            return cls._from_json(path)
        for name in INDEX_NAMES:
            if os.path.isfile(os.path.join(path, name)):
                return cls._from_json(os.path.join(path, name))
        return cls._scan(path)

    @classmethod
    def _scan(cls, folder: str) -> "RemindDataset":
        folder = os.path.abspath(folder)
        img = os.path.join(folder, "imagesTr")
        img = img if os.path.isdir(img) else folder
        root = os.path.dirname(img) if os.path.basename(img) == "imagesTr" else img
        cases: dict = {}
        for f in sorted(os.listdir(img)):
            m = FILE_RE.match(f)
            if m:
                cases.setdefault(m.group(1), RemindCase(m.group(1), root=root)).files[m.group(2)] = \
                    os.path.join(img, f)
        if not cases:
            raise ValueError(f"no ReMIND2Reg_<case>_<modality>.nii.gz images in {img!r}")
        return cls(root, cases, None, _default_pairs(cases))

    @classmethod
    def _from_json(cls, path: str) -> "RemindDataset":
        try:
            with open(path) as fh:
                index = json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read ReMIND2Reg dataset JSON {path!r}: {e}") from None
        if not isinstance(index, dict) or not isinstance(index.get("training"), list):
            raise ValueError(f"{path!r} is not a ReMIND2Reg dataset JSON (no 'training' list)")
        root = os.path.dirname(os.path.abspath(path))
        cases: dict = {}

        def add(rel):
            name = os.path.basename(str(rel))
            m = FILE_RE.match(name)
            if not m:
                raise ValueError(f"{path!r}: entry {rel!r} is not ReMIND2Reg_<case>_<modality>.nii.gz")
            cases.setdefault(m.group(1), RemindCase(m.group(1), root=root)).files[m.group(2)] = \
                os.path.normpath(os.path.join(root, str(rel)))
            return m.group(1), m.group(2)

        for e in index["training"]:
            if not isinstance(e, dict) or "image" not in e:
                raise ValueError(f"{path!r}: 'training' entry {e!r} has no 'image'")
            add(e["image"])

        def pairs_of(key):
            out = []
            for e in index.get(key) or []:
                (cf, mf), (cm, mm) = add(e["fixed"]), add(e["moving"])
                out.append((cf, mf, mm))
            return out

        return cls(root, cases, index, pairs_of("training_paired_images"), pairs_of("registration_val"))

    # --- queries ------------------------------------------------------------------------------
    def case_ids(self) -> list:
        return sorted(self.cases)

    def case(self, case_id=None) -> RemindCase:
        """A case by id ('0042', '42' or 42); None: the only case (ValueError if several)."""
        if case_id is None:
            if len(self.cases) == 1:
                return next(iter(self.cases.values()))
            raise ValueError(f"dataset {self.root!r} has {len(self.cases)} cases; choose one with "
                             f"--case-id (e.g. {', '.join(self.case_ids()[:5])})")
        cid = f"{int(case_id):04d}" if str(case_id).isdigit() else str(case_id)
        if cid not in self.cases:
            more = " ..." if len(self.cases) > 8 else ""
            raise ValueError(f"case {case_id!r} is not in dataset {self.root!r} "
                             f"(cases: {', '.join(self.case_ids()[:8])}{more})")
        return self.cases[cid]

    def __len__(self):
        return len(self.cases)

    def __iter__(self):
        return iter(self.cases[c] for c in self.case_ids())

    def counts(self) -> dict:
        """{modality code: number of cases having it}."""
        out: dict = {}
        for c in self.cases.values():
            for m in c.files:
                out[m] = out.get(m, 0) + 1
        return dict(sorted(out.items()))


def _us_display_scale(vol: Volume, path: str) -> None:
    """Ultrasound stored as 0..255 (8-bit B-mode, 0 = not acquired): intensity = value / 255, the
    simulator's display scale, instead of the robust percentile normalisation (in place)."""
    import nibabel as nib

    raw = np.asarray(nib.load(path).dataobj, dtype=np.float32).reshape(vol.shape)
    if raw.min() >= 0 and raw.max() <= 255 and raw.max() > 1:
        vol.channels[..., 0] = raw / 255.0
        vol.meta["intensity_scale"] = "value / 255"
    else:
        vol.meta["intensity_scale"] = "robust percentiles (0.5 %, 99.5 %) -> [0, 1]"


def _default_pairs(cases: dict) -> list:
    return [(cid, US, m) for cid, c in sorted(cases.items()) if US in c.files
            for m in MRI_MODALITIES if m in c.files]


def open_case(path, case_id=None) -> RemindCase:
    """The case at ``path`` (dataset folder, JSON or one image file) and ``case_id``."""
    return RemindDataset.open(path).case(case_id)


def us_default_pose(us: Volume, mri: Volume | None = None, threshold: float = 0.0) -> Pose:
    """A probe pose guessed from where the ultrasound volume has data: on the outer face of the
    covered region (away from the MRI content's centre, or the volume centre), looking inwards
    through the centroid of the coverage."""
    cov = us.display_channel() > threshold
    if not cov.any():
        raise ValueError(f"ultrasound volume {us.name!r} is empty (no voxel above {threshold})")
    idx = np.argwhere(cov)[:: max(1, int(cov.sum()) // 200000)]
    pts = us.voxel_to_world(idx)
    c = pts.mean(0)
    if mri is not None:
        m = mri.display_channel() > 0.2
        ref = mri.voxel_to_world(np.argwhere(m)[:: max(1, int(m.sum()) // 200000)]).mean(0) \
            if m.any() else mri.centre_mm
    else:
        ref = us.centre_mm
    u = c - ref
    if np.linalg.norm(u) < 1e-6:
        u = np.array([0.0, 0.0, 1.0])
    u /= np.linalg.norm(u)
    top = float(((pts - c) @ u).max())
    hint = np.array([1.0, 0.0, 0.0]) if abs(u[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    return Pose.look_at(c + top * u, -u, hint)


# --------------------------------------------------------------------------------------------
# synthetic cases in the ReMIND2Reg layout
# --------------------------------------------------------------------------------------------
T2_WEIGHTS = {"csf": 1.0, "grey_matter": 0.55, "white_matter": 0.35, "cortical_bone": 0.05,
              "scalp": 0.45}


def grid_affine(centre_mm, size_mm, spacing_mm) -> tuple[np.ndarray, tuple]:
    """Axis-aligned grid of ``spacing_mm`` covering a cube of ``size_mm`` around ``centre_mm``:
    (4, 4) voxel -> world mm affine and its shape."""
    n = int(round(float(size_mm) / spacing_mm))
    A = np.diag([spacing_mm] * 3 + [1.0])
    A[:3, 3] = np.asarray(centre_mm, dtype=np.float64) - spacing_mm * (n - 1) / 2.0
    return A, (n, n, n)


def resample_channel(vol: Volume, data: np.ndarray, affine, shape) -> np.ndarray:
    """``data`` (on ``vol``'s grid) trilinearly resampled onto the grid (affine, shape); 0 outside."""
    from .simulator import sample_trilinear_np

    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    return sample_trilinear_np(data, vol.world_to_index(world)).reshape(shape).astype(np.float32)


def write_nifti(path: str, data: np.ndarray, affine) -> str:
    """Write a 3-D array as NIfTI (.nii.gz) with the given voxel -> world mm affine."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    img.set_qform(np.asarray(affine), code=1)
    img.set_sform(np.asarray(affine), code=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    nib.save(img, path)
    return path


def write_dataset_json(root: str, cases: dict, val_ids=()) -> str:
    """``root/ReMIND2Reg_dataset.json`` in the real schema for ``cases`` {id: modality codes}."""
    training, pairs, val = [], [], []
    for cid in sorted(cases):
        for m in sorted(cases[cid]):
            training.append({"image": f"./imagesTr/{image_name(cid, m)}"})
        if US in cases[cid]:
            for m in MRI_MODALITIES:
                if m in cases[cid]:
                    e = {"fixed": f"./imagesTr/{image_name(cid, US)}",
                         "moving": f"./imagesTr/{image_name(cid, m)}"}
                    (val if cid in val_ids else pairs).append(e)
    index = {"name": "ReMIND2Reg", "release": "2.1",
             "description": "synthetic ReMIND2Reg-layout cases made by diffus-taichi from the "
                            "built-in MNI152 brain (US = compounded simulated sweep)",
             "licence": "see assets/LICENSE_MNI152.txt", "reference": "", "pairings": "paired",
             "provided_data": {"0": ["image"]}, "registration_direction": {"fixed": 0, "moving": 1},
             "modality": {"0": "US", "1": "MR", "2": "MR"},
             "img_shift": {"fixed": "intraoperative", "moving": "preoperative"}, "labels": {},
             "tensorImageSize": {"0": "3D"}, "tensorImageShape": {"0": []},
             "numTraining": len(training), "numTest": 0, "training": training, "test": [],
             "numPairedTraining": len(pairs), "training_paired_images": pairs,
             "numPairedTest": 0, "test_paired_images": [], "numRegistration_val": len(val),
             "registration_val": val, "numRegistration_test": 0, "registration_test": [],
             "version": "1.0"}
    path = os.path.join(root, INDEX_NAMES[0])
    with open(path, "w") as fh:
        json.dump(index, fh, indent=4)
    return path


def make_synthetic_case(root: str, case_id: str = "0000", size_mm: float = 96.0,
                        spacing_mm: float = 1.0, with_t2: bool = True, with_us: bool = True,
                        sweep_frames: int = 41, sweep_length_mm: float = 20.0,
                        probe="craniotomy", sim=None, seed: int = 0, arch=None,
                        progress: bool | None = False) -> RemindCase:
    """Write one synthetic case under ``root/imagesTr`` in the ReMIND2Reg layout, cut from the
    built-in brain around its craniotomy: a cube of ``size_mm`` at ``spacing_mm``.

    0001: the T1 channel (float32); 0002 (``with_t2``): a T2-like contrast from the tissue
    fractions; 0000 (``with_us``): a freehand-like sweep of ``sweep_frames`` simulated B-mode
    frames (built-in brain, tissue model, coherent speckle) over ``sweep_length_mm`` along the
    probe's elevation axis through the default pose, compounded on the same grid (uint8, 0 =
    not covered). The sweep poses are stored in ``root/synthetic/`` (not part of real data).
    ``sim``: a Simulator on the built-in brain to reuse (its probe is used)."""
    from . import sweep as sweep_mod
    from .volume import load_volume

    brain = sim.volume if sim is not None else load_volume("brain")
    centre = brain.default_pose.probe_to_world(np.array([0.0, 0.0, 0.4 * size_mm]))
    A, shape = grid_affine(centre, size_mm, spacing_mm)
    files = {CET1: resample_channel(brain, brain.display_channel(), A, shape)}
    if with_t2:
        t2 = sum(w * brain.channel(n) for n, w in T2_WEIGHTS.items() if n in brain.channel_names)
        files[T2] = resample_channel(brain, np.asarray(t2, np.float32), A, shape)
    out = {}
    for m, data in files.items():
        out[m] = write_nifti(os.path.join(root, "imagesTr", image_name(case_id, m)),
                             data.astype(np.float32), A)
    if with_us:
        if sim is None:
            from .simulator import Simulator
            sim = Simulator(brain, probe=probe, arch=arch, seed=seed)
        poses = sweep_mod.freehand_path(brain.default_pose, sweep_frames, sweep_length_mm, seed=seed)
        us, _ = sweep_mod.sweep(sim, poses, A, shape, progress=progress)
        out[US] = write_nifti(os.path.join(root, "imagesTr", image_name(case_id, US)),
                              sweep_mod.to_uint8(us), A)
        meta = os.path.join(root, SYNTHETIC_DIR, f"ReMIND2Reg_{case_id}_sweep.json")
        os.makedirs(os.path.dirname(meta), exist_ok=True)
        with open(meta, "w") as fh:
            json.dump({"poses_mm_rad": [p.as_vector().tolist() for p in poses],
                       "probe": repr(sim.probe), "seed": seed}, fh)
    log.info("synthetic ReMIND2Reg case %s: %s", case_id, ", ".join(sorted(out)))
    return RemindCase(case_id, out, os.path.abspath(root))
