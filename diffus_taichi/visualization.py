"""Figures: the MRI resliced in the image plane beside the simulated B-mode fan, both in mm."""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def render_figure(sim, fan: np.ndarray, path: str, title: str | None = None, dpi: int = 110) -> str:
    """Save a two-panel PNG: MRI reslice with the fan outline | B-mode fan (mm axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probe = sim.probe
    x, z = probe.fan_axes_mm()
    px = probe.fan_pixel_mm()
    extent = (x[0] - px / 2, x[-1] + px / 2, z[-1] + px / 2, z[0] - px / 2)
    mri = sim.reslice()
    outline = probe.outline_mm()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.4), constrained_layout=True)
    ax = axes[0]
    ax.imshow(mri, cmap="gray", extent=extent, vmin=0, vmax=max(float(mri.max()), 1e-6))
    ax.plot(outline[:, 0], outline[:, 1], color="#ffb000", lw=1.2)
    ax.set_title(f"MRI ({sim.volume.name}) resliced in the image plane")
    ax = axes[1]
    ax.imshow(fan, cmap="gray", extent=extent, vmin=0, vmax=1)
    ax.set_title(f"simulated B-mode ({sim.echo_model}, {probe.frequency_mhz:g} MHz, "
                 f"{sim.settings.dynamic_range_db:g} dB)")
    for ax in axes:
        ax.set_xlabel("lateral x (mm)")
        ax.set_ylabel("depth z (mm)")
        ax.set_facecolor("black")
    pose = sim.last_pose
    fig.suptitle(title or f"pose t = ({', '.join(f'{v:.1f}' for v in pose.translation_mm)}) mm, "
                 f"rotvec = ({', '.join(f'{v:.1f}' for v in np.degrees(pose.rotvec_rad))}) deg; "
                 f"probe {probe.name} {probe.n_lines}x{probe.n_samples}", fontsize=10)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    log.info("wrote %s", path)
    return path
