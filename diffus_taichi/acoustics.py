"""Acoustic properties: MRI channels -> impedance (MRayl), attenuation (dB/cm/MHz) and
scattering strength (dimensionless), either

* ``tissue``: a tissue table (``assets/tissues.csv``, literature values with sources) applied
  through tissue-fraction channels: p = p_background + sum_c f_c (p_tissue(c) - p_background); or
* ``transfer``: a piecewise-linear transfer function of normalised MRI intensity with K uniform
  knots on [0, 1]; impedance must be non-decreasing in intensity (monotone); or
* ``mlp``: a small MLP of MRI intensity and optionally neighbourhood features
  (:mod:`~diffus_taichi.mlp_mapping`), evaluated per voxel.

Default curves by MRI contrast (names for :func:`get_mapping`, ``Simulator(mapping=...)`` and
``--mapping``): ``t1`` = the ``transfer`` mapping with :data:`T1_TRANSFER_KNOTS` (monotone: dark
CSF -> bright white matter); ``t2`` = an ``mlp`` mapping initialised to :data:`T2_MLP_KNOTS`
(:func:`t2_mapping`; non-monotone: bright CSF has a low impedance, darker white matter a higher
one, so no monotone transfer function fits it). ``auto`` picks ``t2`` for a volume that
:func:`mri_contrast` recognises as T2-weighted.

The parameters live in Taichi fields (see :class:`~diffus_taichi.simulator.Simulator`) so that
gradients can reach them.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
TISSUE_CSV = os.path.join(ASSETS, "tissues.csv")
PROPS = ("impedance_MRayl", "attenuation_dB_cm_MHz", "scattering")
BACKGROUND = "water"
MAPPING_KINDS = ("tissue", "transfer", "mlp")
MAPPING_PRESETS = ("t1", "t2")          # default curves by MRI contrast (see get_mapping)

log = logging.getLogger(__name__)


@dataclass
class Tissue:
    name: str
    impedance_MRayl: float
    attenuation_dB_cm_MHz: float
    scattering: float
    speed_m_s: float = float("nan")
    density_kg_m3: float = float("nan")
    source: str = ""

    def props(self) -> np.ndarray:
        return np.array([self.impedance_MRayl, self.attenuation_dB_cm_MHz, self.scattering])


def _check_props(name: str, z: float, a: float, s: float, where: str) -> None:
    if not math.isfinite(z) or z <= 0:
        raise ValueError(f"{where}: tissue {name!r} has non-positive or non-finite impedance "
                         f"{z!r} MRayl (impedance must be > 0)")
    if not math.isfinite(a) or a < 0:
        raise ValueError(f"{where}: tissue {name!r} has negative or non-finite attenuation {a!r} dB/cm/MHz")
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"{where}: tissue {name!r} has negative or non-finite scattering {s!r}")


class TissueTable:
    """Ordered tissues by name. ``TissueTable.load(path)`` reads the CSV."""

    def __init__(self, tissues: list[Tissue], where: str = "tissue table"):
        if not tissues:
            raise ValueError(f"{where}: no tissues")
        for t in tissues:
            _check_props(t.name, t.impedance_MRayl, t.attenuation_dB_cm_MHz, t.scattering, where)
        self.tissues = {t.name: t for t in tissues}
        self.where = where

    @classmethod
    def load(cls, path: str | None = None) -> "TissueTable":
        path = path or TISSUE_CSV
        if not os.path.exists(path):
            raise FileNotFoundError(f"tissue table not found: {path!r}")
        tissues = []
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("name", "").strip()
                    and not r["name"].startswith("#")]
        for r in rows:
            try:
                tissues.append(Tissue(
                    name=r["name"].strip(),
                    impedance_MRayl=float(r["impedance_MRayl"]),
                    attenuation_dB_cm_MHz=float(r["attenuation_dB_cm_MHz"]),
                    scattering=float(r["scattering"]),
                    speed_m_s=float(r.get("speed_m_s") or "nan"),
                    density_kg_m3=float(r.get("density_kg_m3") or "nan"),
                    source=(r.get("source") or "").strip()))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"tissue table {path!r}: bad row {r!r}: {e}") from None
        return cls(tissues, where=f"tissue table {path!r}")

    def __getitem__(self, name: str) -> Tissue:
        if name not in self.tissues:
            raise KeyError(f"{self.where}: no tissue {name!r} (has {', '.join(self.tissues)})")
        return self.tissues[name]

    def __contains__(self, name) -> bool:
        return name in self.tissues

    def names(self) -> list[str]:
        return list(self.tissues)


# Default transfer function for normalised T1-weighted intensity (dark CSF -> bright white matter).
T1_TRANSFER_KNOTS = np.array([
    # impedance MRayl, attenuation dB/cm/MHz, scattering
    [1.500, 0.002, 0.00],   # 0.00 background / water
    [1.510, 0.010, 0.01],   # 0.25 CSF
    [1.600, 0.600, 0.10],   # 0.50 grey matter
    [1.620, 0.900, 0.16],   # 0.75 white matter
    [1.640, 1.000, 0.20],   # 1.00 brightest tissue
])


def check_knots(knots, where: str = "transfer") -> np.ndarray:
    """``knots`` as a (K >= 2, 3) float64 array [MRayl, dB/cm/MHz, scattering] with impedance > 0
    and attenuation, scattering >= 0 (ValueError naming ``where`` otherwise). No monotonicity
    check: that is the ``transfer`` kind's own rule."""
    try:
        k = np.asarray(knots, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where} knots must be a (K >= 2, 3) array of numbers "
                         f"[MRayl, dB/cm/MHz, scattering]: {e}") from None
    if k.ndim != 2 or k.shape[1] != 3 or k.shape[0] < 2:
        raise ValueError(f"{where} knots must have shape (K >= 2, 3), got {k.shape}")
    for i, (z, a, s) in enumerate(k):
        _check_props(f"knot {i}", z, a, s, f"{where} function" if where == "transfer" else where)
    return k


# Default curve for normalised T2-weighted intensity (spin echo / fast spin echo, CSF brightest),
# K = 9 uniform knots on [0, 1] like T1_TRANSFER_KNOTS; every row is a row of assets/tissues.csv
# (values and sources there: IT'IS/Duck 1990 for CSF, Goss et al. via Mech. Mater. 2012 44:174
# for brain, Duck 1990/Azhari 2010 for blood, Diagnostics 2023 13:855 for attenuations).
# T2 intensity order of head tissues (relaxation times at 3 T roughly: white matter ~70 ms <
# grey matter ~100 ms << CSF > 1 s; Stanisz et al. 2005 Magn Reson Med 54:507, Wansapura et al.
# 1999 J Magn Reson Imaging 9:531): CSF and other fluid brightest; oedema/tumour hyperintense;
# grey matter; white matter darker; fast-flowing blood, cortical bone, air and the background
# dark (signal voids). Intensities are after load_nifti's robust normalisation (0.5/99.5
# percentiles: CSF ~ 1, background 0). On the built-in brain, remind.T2_WEIGHTS (the synthetic
# ReMIND T2) puts white matter at 0.36, grey matter at 0.56, CSF at 1.0: on the plateaus below.
# The impedance is NOT monotone in T2 intensity (CSF 1.521 < grey 1.615 < white 1.622 MRayl
# while the signal falls from CSF to white matter), hence an MLP and not the transfer kind.
# Not separable by T2 intensity, documented choices:
# * cortical bone (6.65 MRayl) and air (0.0004 MRayl) have no signal, like the background, but
#   the most extreme impedances: intensity cannot tell them apart from each other or from the
#   background, so (as in the T1 curve, where bone is dark too) they get the background's
#   water values. A bone knot next to the background one would also turn every partial-volume
#   voxel at the edge of a zero background into a 4.5x impedance spike. Use the tissue model
#   (tissue-fraction channels) or a fitted mapping (fit-mapping) for a skull echo.
# * fat (1.377 MRayl, the lowest soft tissue) is intermediate-to-bright on fast spin echo T2
#   (J-coupling; Henkelman et al. 1992 J Magn Reson Imaging 2:533), i.e. in the grey matter /
#   oedema range; it is outside the brain (scalp, orbit), not under a craniotomy probe, so the
#   curve follows brain tissue there (fat would get ~+17 % impedance).
# * FLAIR (T2-weighted with the CSF signal nulled) is not matched by mri_contrast: its curve
#   differs (fit one with fit-mapping).
T2_MLP_KNOTS = np.array([
    # impedance MRayl, attenuation dB/cm/MHz, scattering     I      T2 signal: tissue (table row)
    [1.480, 0.0022, 0.00],   # 0.000 none: background, bone, air -> coupling water (water)
    [1.669, 0.150, 0.01],    # 0.125 flow voids: arteries, sinuses (blood; anechoic lumen)
    [1.622, 0.900, 0.15],    # 0.250 dark tissue: white matter, lower end (white_matter)
    [1.622, 0.900, 0.15],    # 0.375 white matter (white_matter)
    [1.615, 0.600, 0.08],    # 0.500 grey matter (grey_matter)
    [1.615, 0.600, 0.08],    # 0.625 grey matter, upper end / cortex (grey_matter)
    [1.641, 0.800, 0.30],    # 0.750 hyperintense: tumour, oedema (tumour; hyperechoic glioma)
    [1.528, 0.0022, 0.00],   # 0.875 fluid: cyst, fluid-filled cavity, CSF partial volume
    #                                (resection_cavity: saline ~ water, anechoic)
    [1.521, 0.002, 0.00],    # 1.000 CSF, brightest (csf)
])
T2_MLP_HIDDEN = (32,)      # tanh units; knots within 0.0002 MRayl (24: 0.0004, 16: 0.0009)
T2_KNOT_WEIGHT = 100.0     # least-squares weight of the knots in the MLP start (init_weights)


@dataclass
class AcousticMapping:
    """How channels become acoustic properties.

    kind: ``tissue`` (table + tissue-fraction channels), ``transfer`` or ``mlp`` (intensity
    channel).
    knots: (K, 3) transfer-function values [MRayl, dB/cm/MHz, scattering] at K uniform
    intensity knots on [0, 1] (kind ``transfer``).
    mlp: :class:`~diffus_taichi.mlp_mapping.MLPParams` (kind ``mlp``; default: one hidden layer
    of 16 tanh units on intensity, initialised to the T1 transfer function). Outside the volume
    the background tissue (water) is assumed for ``mlp``.
    overrides: {tissue name: (MRayl, dB/cm/MHz, scattering)} replacing table rows.
    """

    kind: str = "tissue"
    table: TissueTable | None = None
    knots: np.ndarray | None = None
    background: str = BACKGROUND
    overrides: dict = field(default_factory=dict)
    mlp: "object | None" = None

    def __post_init__(self):
        if self.kind not in MAPPING_KINDS:
            raise ValueError(f"mapping kind must be one of {', '.join(MAPPING_KINDS)}, got {self.kind!r}")
        if self.kind == "mlp":
            from .mlp_mapping import MLPParams

            if self.mlp is None:
                self.mlp = MLPParams()
            elif isinstance(self.mlp, dict):
                self.mlp = MLPParams.from_dict(self.mlp)
            elif not isinstance(self.mlp, MLPParams):
                raise ValueError(f"mlp must be MLPParams or a dict, got {type(self.mlp).__name__}")
        if self.table is None:
            self.table = TissueTable.load()
        if self.kind == "transfer":
            k = check_knots(T1_TRANSFER_KNOTS if self.knots is None else self.knots, "transfer")
            if np.any(np.diff(k[:, 0]) < 0):
                raise ValueError("transfer function: impedance knots must be non-decreasing "
                                 f"(monotone), got {k[:, 0].tolist()}; for a non-monotone curve "
                                 "(e.g. T2 contrast) use an MLP started at the knots: "
                                 "AcousticMapping('mlp', mlp=MLPParams(init_knots=knots, "
                                 "init_knot_weight=100)) or mapping 't2'")
            self.knots = k
        for name, p in self.overrides.items():
            _check_props(name, *map(float, p), "mapping override")

    def tissue_props(self, name: str) -> np.ndarray:
        if name in self.overrides:
            return np.asarray(self.overrides[name], dtype=np.float64)
        return self.table[name].props()

    def table_arrays(self, volume) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(T, 3) property rows (row 0 = background), (C,) row index per channel (-1 = not a
        tissue channel), and the row names."""
        names = [self.background]
        chan = []
        for cname in volume.channel_names:
            if cname == "intensity" or self.kind in ("transfer", "mlp"):
                chan.append(-1)
                continue
            if cname not in names:
                names.append(cname)
            chan.append(names.index(cname))
        rows = np.stack([self.tissue_props(n) for n in names])
        return rows, np.array(chan, dtype=np.int32), names

    def check_volume(self, volume) -> None:
        if self.kind in ("transfer", "mlp") and volume.intensity_index is None:
            raise ValueError(f"mapping {self.kind!r} needs an intensity channel; volume "
                             f"{volume.name!r} has {volume.channel_names}")
        if self.kind == "tissue":
            missing = [n for n in volume.tissue_names if n not in self.table and n not in self.overrides]
            if missing:
                raise ValueError(f"volume {volume.name!r} has tissue channels {missing} that are not "
                                 f"in the tissue table ({', '.join(self.table.names())})")
            if not volume.tissue_names:
                raise ValueError(f"mapping 'tissue' needs tissue-fraction channels; volume "
                                 f"{volume.name!r} has only {volume.channel_names}: use mapping "
                                 "'transfer'")

    # --- files --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"kind": self.kind, "background": self.background,
             "overrides": {k: list(map(float, v)) for k, v in self.overrides.items()}}
        if self.kind == "transfer":
            d["knots"] = self.knots.tolist()
        if self.kind == "mlp":
            d["mlp"] = self.mlp.to_dict()
        return d

    def save(self, path: str) -> None:
        with open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2)

    @classmethod
    def load(cls, path: str) -> "AcousticMapping":
        if not os.path.exists(path):
            raise FileNotFoundError(f"mapping file not found: {path!r}")
        try:
            with open(path) as fh:
                d = json.load(fh)
        except Exception as e:
            raise ValueError(f"mapping file {path!r}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"mapping file {path!r}: expected a JSON object, got {type(d).__name__}")
        return cls(kind=d.get("kind", "tissue"), knots=d.get("knots"), mlp=d.get("mlp"),
                   background=d.get("background", BACKGROUND), overrides=d.get("overrides", {}))


# ---------------------------------------------------------------------------------------------
# default mappings by MRI contrast
# ---------------------------------------------------------------------------------------------
def t1_mapping(**kw) -> AcousticMapping:
    """The default T1 mapping: kind ``transfer`` with :data:`T1_TRANSFER_KNOTS` (``kw``: table,
    background, overrides)."""
    return AcousticMapping("transfer", knots=T1_TRANSFER_KNOTS.copy(), **kw)


def t2_mapping(features=("intensity",), hidden=T2_MLP_HIDDEN, seed: int = 0, knots=None,
               knot_weight: float = T2_KNOT_WEIGHT, **kw) -> AcousticMapping:
    """The default T2 mapping: kind ``mlp`` (``features``, ``hidden`` as for
    :class:`~diffus_taichi.mlp_mapping.MLPParams`) whose weights start at the non-monotone
    curve :data:`T2_MLP_KNOTS` (or ``knots``, (K, 3), any shape) on flat tissue, fitted with
    knot weight ``knot_weight``. Trainable like any MLP mapping (``fit-mapping``). ``kw``: table,
    background, overrides."""
    from .mlp_mapping import MLPParams

    k = check_knots(T2_MLP_KNOTS if knots is None else knots, "T2 mapping")
    return AcousticMapping("mlp", mlp=MLPParams(features, hidden, seed=seed, init_knots=k,
                                                init_knot_weight=knot_weight), **kw)


_PRESET_BUILDERS = {"t1": t1_mapping, "t2": t2_mapping}
# ReMIND2Reg modality codes (remind.CET1, remind.T2): contrast-enhanced T1 is T1-weighted
_REMIND_CONTRAST = {"0001": "T1", "0002": "T2"}
_REMIND_NAME = re.compile(r"^ReMIND2Reg_[^_]+_(000[12])(\.nii(\.gz)?)?$")
_BIDS_NAME = re.compile(r"_(T1w|T2w)(\.nii(\.gz)?)?$", re.IGNORECASE)
_CONTRAST_NAMES = {"T1": "T1", "T1W": "T1", "CET1": "T1", "T2": "T2", "T2W": "T2"}


def mri_contrast(volume) -> str | None:
    """``"T1"``, ``"T2"`` or None (unknown) for an intensity volume, from (first that applies):
    ``volume.meta["contrast"]`` (T1, T1w, ceT1, T2, T2w; any other value, e.g. FLAIR, means
    not T1/T2); the ReMIND2Reg modality that :meth:`~diffus_taichi.remind.RemindCase.load` stores
    in ``meta["modality"]`` (0001 ceT1, 0002 T2); a ReMIND2Reg file name
    (``ReMIND2Reg_<case>_0002.nii.gz``) or a BIDS suffix (``*_T2w.nii.gz``, ``*_T1w.nii.gz``)
    in the volume name or ``meta["path"]``."""
    meta = getattr(volume, "meta", None) or {}
    c = meta.get("contrast")
    if isinstance(c, str) and c.strip():
        return _CONTRAST_NAMES.get(c.strip().upper())
    if "case" in meta and meta.get("modality") in _REMIND_CONTRAST:
        return _REMIND_CONTRAST[meta["modality"]]
    for name in (getattr(volume, "name", "") or "", os.path.basename(str(meta.get("path", "")))):
        m = _REMIND_NAME.match(name)
        if m:
            return _REMIND_CONTRAST[m.group(1)]
        m = _BIDS_NAME.search(name)
        if m:
            return m.group(1).upper()[:2]
    return None


def _auto_mapping(volume) -> AcousticMapping:
    if volume.tissue_names:
        return AcousticMapping("tissue")
    if mri_contrast(volume) == "T2":
        log.info("mapping auto: volume %r is T2-weighted: default T2 mapping (MLP on the "
                 "T2_MLP_KNOTS curve)", volume.name)
        return t2_mapping()
    return AcousticMapping("transfer")


def get_mapping(spec, volume) -> AcousticMapping:
    """``None``/'auto' (tissue if the volume has tissue channels, else the T2 curve if
    :func:`mri_contrast` says T2, else the T1 transfer function), 'tissue', 'transfer', 'mlp'
    (default MLP, started at the T1 curve), 't1' (= 'transfer' with the T1 knots), 't2'
    (:func:`t2_mapping`), a JSON mapping file, or an AcousticMapping."""
    if isinstance(spec, AcousticMapping):
        m = spec
    elif spec in (None, "auto"):
        m = _auto_mapping(volume)
    elif spec in MAPPING_KINDS:
        m = AcousticMapping(spec)
    elif isinstance(spec, str) and spec.strip().lower() in MAPPING_PRESETS:
        name = spec.strip().lower()
        if volume.intensity_index is None:
            raise ValueError(f"mapping {spec!r} maps {name.upper()}-weighted MRI intensity and "
                             f"needs an intensity channel; volume {volume.name!r} has only "
                             f"tissue-fraction channels {list(volume.channel_names)}: use "
                             "mapping 'tissue' (or 'auto')")
        m = _PRESET_BUILDERS[name]()
    elif isinstance(spec, str) and (spec.endswith(".json") or os.path.exists(spec)):
        m = AcousticMapping.load(spec)
    else:
        raise ValueError(f"unknown mapping {spec!r}: use auto, tissue, transfer, mlp, t1, t2 or a "
                         ".json file")
    m.check_volume(volume)
    return m
