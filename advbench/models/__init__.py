"""Models: the reference architectures, loaders for saved files, import paths, torchvision, timm and
robustbench, and reading the models ``advbench train`` wrote. (The trained reference models, the
zoo, are :mod:`advbench.zoo`.) torchvision, timm and robustbench are imported only when a loader
that needs them is called.
"""

from advbench.models.layers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
    with_normalization,
)
from advbench.models.loaders import (
    load_import_path,
    load_model_file,
    load_robustbench,
    load_timm,
    load_torchvision,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Normalize",
    "load_import_path",
    "load_model_file",
    "load_robustbench",
    "load_timm",
    "load_torchvision",
    "with_normalization",
]
