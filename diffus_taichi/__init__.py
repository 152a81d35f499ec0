"""diffus-taichi: differentiable B-mode ultrasound simulation from 3-D MRI volumes in Taichi.

Data flow (one module per stage): volume -> acoustics -> pose/probe -> rays -> march -> echo ->
image -> scan -> simulator (facade) -> cli; ``fused`` runs march + echo + image in two kernels
when no gradient is taken.
"""
from .taichi_patches import install_import_hook

install_import_hook()      # before anything imports taichi: see taichi_patches (start-up time)

from .acoustics import AcousticMapping, TissueTable, get_mapping, mri_contrast, t1_mapping, t2_mapping  # noqa: E402
from .pose import Pose, matrix_to_rotvec, rotvec_to_matrix  # noqa: E402
from .probe import PRESETS, Probe, get_probe  # noqa: E402
from .volume import BUILTINS, Volume, load_nifti, load_volume, register_builtin  # noqa: E402

__version__ = "0.1.0"

__all__ = ["AcousticMapping", "TissueTable", "get_mapping", "mri_contrast", "t1_mapping", "t2_mapping", "Pose", "matrix_to_rotvec",
           "rotvec_to_matrix", "PRESETS", "Probe", "get_probe", "BUILTINS", "Volume", "load_nifti",
           "load_volume", "register_builtin", "Simulator", "layered_returns"]


def __getattr__(name):   # lazy: importing the package does not start Taichi kernels
    if name == "Simulator":
        from .simulator import Simulator
        return Simulator
    if name == "layered_returns":
        from .echo import layered_returns
        return layered_returns
    raise AttributeError(name)
