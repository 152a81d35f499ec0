"""Acoustic properties: MRI channels -> impedance (MRayl), attenuation (dB/cm/MHz) and
scattering strength (dimensionless), either

* ``tissue``: a tissue table (``assets/tissues.csv``, literature values with sources) applied
  through tissue-fraction channels: p = p_background + sum_c f_c (p_tissue(c) - p_background); or
* ``transfer``: a piecewise-linear transfer function of normalised MRI intensity with K uniform
  knots on [0, 1]; impedance must be non-decreasing in intensity (monotone); or
* ``mlp``: a small MLP of MRI intensity and optionally neighbourhood features
  (:mod:`~diffus_taichi.mlp_mapping`), evaluated per voxel.

The parameters live in Taichi fields (see :class:`~diffus_taichi.simulator.Simulator`) so that
gradients can reach them.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
TISSUE_CSV = os.path.join(ASSETS, "tissues.csv")
PROPS = ("impedance_MRayl", "attenuation_dB_cm_MHz", "scattering")
BACKGROUND = "water"
MAPPING_KINDS = ("tissue", "transfer", "mlp")


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
            k = np.asarray(T1_TRANSFER_KNOTS if self.knots is None else self.knots, dtype=np.float64)
            if k.ndim != 2 or k.shape[1] != 3 or k.shape[0] < 2:
                raise ValueError(f"transfer knots must have shape (K >= 2, 3), got {k.shape}")
            for i, (z, a, s) in enumerate(k):
                _check_props(f"knot {i}", z, a, s, "transfer function")
            if np.any(np.diff(k[:, 0]) < 0):
                raise ValueError("transfer function: impedance knots must be non-decreasing "
                                 f"(monotone), got {k[:, 0].tolist()}")
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


def get_mapping(spec, volume) -> AcousticMapping:
    """``None``/'auto' (tissue if the volume has tissue channels, else transfer), 'tissue',
    'transfer', 'mlp', a JSON mapping file, or an AcousticMapping."""
    if isinstance(spec, AcousticMapping):
        m = spec
    elif spec in (None, "auto"):
        m = AcousticMapping("tissue" if volume.tissue_names else "transfer")
    elif spec in MAPPING_KINDS:
        m = AcousticMapping(spec)
    elif isinstance(spec, str) and (spec.endswith(".json") or os.path.exists(spec)):
        m = AcousticMapping.load(spec)
    else:
        raise ValueError(f"unknown mapping {spec!r}: use auto, tissue, transfer, mlp or a .json file")
    m.check_volume(volume)
    return m
