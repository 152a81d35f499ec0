"""Probe geometry: scan lines in the probe frame and the Cartesian fan grid.

Probe frame (mm): x = lateral, y = elevation, z = axial (depth, into tissue); origin at the
centre of the probe face. Curvilinear/sector lines start on an arc of radius ``radius_mm``
around the virtual apex (0, 0, -radius_mm) and point away from it; ``radius_mm = 0`` is a phased
(sector) array with all lines starting at the origin. Linear lines start on the x axis, spaced over
``width_mm``, and point along +z. Sample ``s`` of a line sits at depth ``s * sample_spacing_mm``
from the line's origin.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

MAX_SAMPLES = 16384
MAX_LINES = 8192
MAX_RAY_SAMPLES = 1 << 24      # lines * samples
MAX_IMAGE_PX = 8192
SPEED_OF_SOUND_M_S = 1540.0    # used for the wavelength and pulse length only


@dataclass(frozen=True)
class Probe:
    """Probe geometry and acoustic settings (all lengths in mm).

    kind: 'curvilinear' (includes sector: radius_mm = 0) or 'linear'.
    fov_deg: opening angle of a curvilinear/sector fan; width_mm: aperture of a linear array.
    depth_mm: imaging depth; n_lines x n_samples: RF lines and samples per line.
    frequency_mhz, bandwidth (fractional, -6 dB): the transmitted pulse.
    aperture_mm, focus_mm: lateral beam (width ~ wavelength * focus / aperture at the focus).
    elevation_aperture_mm, elevation_focus_mm: elevation beam (fixed lens focus): slice thickness
    ~ wavelength * elevation_focus / elevation_aperture at that depth, wider elsewhere.
    image_px: (height, width) of the scan-converted fan image.
    """

    name: str = "custom"
    kind: str = "curvilinear"
    radius_mm: float = 10.0
    fov_deg: float = 70.0
    width_mm: float = 38.0
    depth_mm: float = 60.0
    n_lines: int = 256
    n_samples: int = 512
    frequency_mhz: float = 7.5
    bandwidth: float = 0.6
    aperture_mm: float = 10.0
    focus_mm: float = 30.0
    image_px: tuple = (512, 512)
    elevation_aperture_mm: float = 4.0
    elevation_focus_mm: float = 25.0

    def __post_init__(self):
        if self.kind == "sector":
            object.__setattr__(self, "kind", "curvilinear")
            object.__setattr__(self, "radius_mm", 0.0)
        object.__setattr__(self, "image_px", tuple(int(v) for v in np.atleast_1d(self.image_px)) * (
            2 if np.size(self.image_px) == 1 else 1))
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if self.kind not in ("curvilinear", "linear"):
            raise ValueError(f"probe kind must be 'curvilinear', 'sector' or 'linear', got {self.kind!r}")
        for name in ("depth_mm", "frequency_mhz", "bandwidth", "aperture_mm", "focus_mm",
                     "elevation_aperture_mm", "elevation_focus_mm"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"probe {name} must be a positive number, got {v!r}")
        if self.depth_mm > 1000:
            raise ValueError(f"probe depth_mm={self.depth_mm} is absurd (max 1000 mm)")
        if self.frequency_mhz > 100:
            raise ValueError(f"probe frequency_mhz={self.frequency_mhz} is absurd (max 100 MHz)")
        for name, lo, hi in (("n_lines", 2, MAX_LINES), ("n_samples", 2, MAX_SAMPLES)):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or not (lo <= v <= hi):
                raise ValueError(f"probe {name} must be an integer in [{lo}, {hi}], got {v!r}")
        if self.n_lines * self.n_samples > MAX_RAY_SAMPLES:
            raise ValueError(f"probe n_lines*n_samples = {self.n_lines * self.n_samples} exceeds "
                             f"{MAX_RAY_SAMPLES}")
        if len(self.image_px) != 2 or not all(8 <= v <= MAX_IMAGE_PX for v in self.image_px):
            raise ValueError(f"probe image_px must be two integers in [8, {MAX_IMAGE_PX}], "
                             f"got {self.image_px!r}")
        if self.kind == "curvilinear":
            if not (0 < self.fov_deg < 180):
                raise ValueError(f"probe fov_deg must be in (0, 180) degrees, got {self.fov_deg!r}")
            if not (math.isfinite(self.radius_mm) and 0 <= self.radius_mm <= 500):
                raise ValueError(f"probe radius_mm must be in [0, 500] mm, got {self.radius_mm!r}")
        else:
            if not (math.isfinite(self.width_mm) and 0 < self.width_mm <= 500):
                raise ValueError(f"probe width_mm must be in (0, 500] mm, got {self.width_mm!r}")

    def with_(self, **changes) -> "Probe":
        """Copy with some settings changed (validated)."""
        return replace(self, **changes)

    # --- scan lines ---------------------------------------------------------------------------
    @property
    def sample_spacing_mm(self) -> float:
        """Distance between consecutive samples along a line (mm)."""
        return self.depth_mm / (self.n_samples - 1)

    @property
    def wavelength_mm(self) -> float:
        return SPEED_OF_SOUND_M_S / 1000.0 / self.frequency_mhz

    def line_angles_rad(self) -> np.ndarray:
        """(n_lines,) steering angle of each line from +z (0 for linear arrays)."""
        if self.kind == "linear":
            return np.zeros(self.n_lines)
        half = math.radians(self.fov_deg) / 2
        return np.linspace(-half, half, self.n_lines)

    def line_geometry(self) -> tuple[np.ndarray, np.ndarray]:
        """Line origins (n_lines, 3) in probe mm and unit directions (n_lines, 3)."""
        th = self.line_angles_rad()
        d = np.stack([np.sin(th), np.zeros_like(th), np.cos(th)], axis=1)
        if self.kind == "linear":
            x = np.linspace(-self.width_mm / 2, self.width_mm / 2, self.n_lines)
            o = np.stack([x, np.zeros_like(x), np.zeros_like(x)], axis=1)
        else:
            apex = np.array([0.0, 0.0, -self.radius_mm])
            o = apex + self.radius_mm * d
        return o, d

    def sample_depths_mm(self) -> np.ndarray:
        """(n_samples,) depth of each sample below its line origin."""
        return np.arange(self.n_samples) * self.sample_spacing_mm

    def lateral_fwhm_mm(self, depth_mm) -> np.ndarray:
        """Pulse-echo lateral FWHM (mm) at ``depth_mm``: transmit beam focused at ``focus_mm``
        (Gaussian beam, FWHM lambda*F# at the focus, widening outside the focal zone) times the
        dynamically focused receive beam of the same aperture, FWHM lambda*z/D; Gaussian
        profiles multiply, so 1/FWHM^2 = 1/FWHM_tx^2 + 1/FWHM_rx^2."""
        z = np.asarray(depth_mm, dtype=np.float64)
        lam = self.wavelength_mm
        tx = _beam_fwhm_mm(lam, self.aperture_mm, self.focus_mm, z)
        rx = np.clip(lam * z / self.aperture_mm, lam / 2, self.aperture_mm)
        return 1.0 / np.sqrt(1.0 / tx ** 2 + 1.0 / rx ** 2)

    def elevation_fwhm_mm(self, depth_mm) -> np.ndarray:
        """Elevation beam FWHM (slice thickness, mm) at ``depth_mm``: the same Gaussian-beam law
        with the elevation aperture and lens focus."""
        return _beam_fwhm_mm(self.wavelength_mm, self.elevation_aperture_mm,
                             self.elevation_focus_mm, depth_mm)

    def axial_fwhm_mm(self) -> float:
        """Axial (pulse-echo) FWHM of the Gaussian pulse envelope in mm."""
        fwhm_t_us = 0.883 / (self.bandwidth * self.frequency_mhz)   # Gaussian time-bandwidth product
        return SPEED_OF_SOUND_M_S / 1000.0 * fwhm_t_us / 2.0

    # --- fan (Cartesian) grid -----------------------------------------------------------------
    def fan_extent_mm(self) -> tuple[float, float, float, float]:
        """(x_min, x_max, z_min, z_max) of the fan in the probe plane (mm)."""
        o, d = self.line_geometry()
        ends = o + self.depth_mm * d
        pts = np.concatenate([o, ends])
        if self.kind == "curvilinear":   # the deep arc bulges beyond its end points
            pts = np.concatenate([pts, [[0.0, 0.0, self.depth_mm]]])
        return (float(pts[:, 0].min()), float(pts[:, 0].max()),
                float(pts[:, 2].min()), float(pts[:, 2].max()))

    def fan_pixel_mm(self) -> float:
        """Isotropic pixel size (mm) of the fan image."""
        x0, x1, z0, z1 = self.fan_extent_mm()
        h, w = self.image_px
        return max((x1 - x0) / (w - 1), (z1 - z0) / (h - 1))

    def fan_axes_mm(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-centre coordinates: x (width,) lateral mm and z (height,) depth mm (row 0 = top)."""
        x0, x1, z0, z1 = self.fan_extent_mm()
        h, w = self.image_px
        px = self.fan_pixel_mm()
        xc, zc = (x0 + x1) / 2, (z0 + z1) / 2
        x = xc + (np.arange(w) - (w - 1) / 2) * px
        z = zc + (np.arange(h) - (h - 1) / 2) * px
        return x, z

    def probe_to_line_coords(self, x_mm, z_mm) -> tuple[np.ndarray, np.ndarray]:
        """Fractional (line index, sample index) of probe-plane points; may fall outside."""
        x_mm, z_mm = np.asarray(x_mm, np.float64), np.asarray(z_mm, np.float64)
        if self.kind == "linear":
            li = (x_mm + self.width_mm / 2) / self.width_mm * (self.n_lines - 1)
            depth = z_mm
        else:
            zz = z_mm + self.radius_mm
            th = np.arctan2(x_mm, zz)
            half = math.radians(self.fov_deg) / 2
            li = (th + half) / (2 * half) * (self.n_lines - 1)
            depth = np.hypot(x_mm, zz) - self.radius_mm
            depth = np.where(zz > 0, depth, -1.0)
        return li, depth / self.sample_spacing_mm

    def scan_grid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per fan pixel: fractional line (H, W), fractional sample (H, W), inside mask (H, W).
        (Evaluated on the broadcast row/column axes: the same element-wise arithmetic as on a
        meshgrid, without the (H, W) coordinate arrays.)"""
        x, z = self.fan_axes_mm()
        li, si = self.probe_to_line_coords(x[None, :], z[:, None])
        shape = (len(z), len(x))
        if li.shape != shape:
            li = np.broadcast_to(li, shape).copy()
        if si.shape != shape:
            si = np.broadcast_to(si, shape).copy()
        inside = (li >= 0) & (li <= self.n_lines - 1) & (si >= 0) & (si <= self.n_samples - 1)
        return li, si, inside

    def outline_mm(self, n: int = 64) -> np.ndarray:
        """Closed fan outline (k, 2) as (x, z) in probe mm, for figures."""
        o, d = self.line_geometry()
        if self.kind == "linear":
            w, D = self.width_mm / 2, self.depth_mm
            return np.array([[-w, 0], [w, 0], [w, D], [-w, D], [-w, 0]])
        half = math.radians(self.fov_deg) / 2
        th = np.linspace(-half, half, n)
        R = self.radius_mm
        near = np.stack([R * np.sin(th), R * np.cos(th) - R], 1)
        far = np.stack([(R + self.depth_mm) * np.sin(th), (R + self.depth_mm) * np.cos(th) - R], 1)
        return np.concatenate([near, far[::-1], near[:1]])


def _beam_fwhm_mm(lam, aperture_mm, focus_mm, depth_mm) -> np.ndarray:
    """Fixed-focus Gaussian beam FWHM (mm): w0 = lambda * F# (F# = focus / aperture) at the focus,
    Rayleigh range pi W0^2 / lambda with W0 = w0 / sqrt(2 ln 2) the 1/e^2 radius, capped at the
    aperture."""
    w0 = max(lam * focus_mm / aperture_mm, lam / 2)
    zr = math.pi * (w0 / math.sqrt(2.0 * math.log(2.0))) ** 2 / lam
    z = np.asarray(depth_mm, dtype=np.float64)
    return w0 * np.sqrt(1.0 + ((z - focus_mm) / zr) ** 2).clip(max=aperture_mm / w0)


PRESETS = {
    # Numbers typical of the probe class (catalogue ranges, not one vendor's data sheet):
    # small-footprint intra-operative convex probe for craniotomies/burr holes, band ~5-10 MHz
    # (centre 7.5 MHz, -6 dB fractional bandwidth 0.7), ~12 mm active aperture, elevation lens
    # ~3.5 mm focused at ~20 mm (slice ~1-2 mm in the focal zone)
    "craniotomy": Probe(name="craniotomy", kind="curvilinear", radius_mm=10.0, fov_deg=70.0,
                        depth_mm=60.0, frequency_mhz=7.5, bandwidth=0.7, aperture_mm=12.0,
                        focus_mm=30.0, elevation_aperture_mm=3.5, elevation_focus_mm=20.0),
    # cardiac/transcranial phased array, band ~2-5 MHz, 16 mm aperture, 13 mm elevation lens
    "phased": Probe(name="phased", kind="curvilinear", radius_mm=0.0, fov_deg=80.0, depth_mm=90.0,
                    frequency_mhz=3.5, bandwidth=0.6, aperture_mm=16.0, focus_mm=50.0,
                    elevation_aperture_mm=13.0, elevation_focus_mm=60.0),
    # abdominal convex, band ~2-6 MHz, 40 mm radius, 12 mm elevation lens at ~70 mm
    "convex": Probe(name="convex", kind="curvilinear", radius_mm=40.0, fov_deg=60.0, depth_mm=120.0,
                    frequency_mhz=4.0, bandwidth=0.7, aperture_mm=30.0, focus_mm=60.0,
                    elevation_aperture_mm=12.0, elevation_focus_mm=70.0),
    # linear array, band 5-13 MHz (centre 9 MHz, fractional bandwidth 0.85), 38 mm footprint,
    # 4 mm elevation lens focused at ~18 mm
    "linear": Probe(name="linear", kind="linear", width_mm=38.0, depth_mm=40.0, frequency_mhz=9.0,
                    bandwidth=0.85, aperture_mm=12.0, focus_mm=20.0, elevation_aperture_mm=4.0,
                    elevation_focus_mm=18.0),
}
DEFAULT_PROBE = "craniotomy"


def get_probe(spec: "str | Probe | None" = None, **overrides) -> Probe:
    """A preset by name (``craniotomy``, ``phased``, ``convex``, ``linear``) or a Probe, with
    optional setting overrides, e.g. ``get_probe('linear', n_lines=128)``."""
    if spec is None:
        spec = DEFAULT_PROBE
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown probe preset {spec!r}; choose one of {', '.join(PRESETS)}")
        spec = PRESETS[spec]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return spec.with_(**overrides) if overrides else spec
