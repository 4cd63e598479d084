"""Models: the reference zoo and loaders for saved files, import paths, torchvision, timm, robustbench.

Importing this package registers the zoo (``digits-mlp``, ``digits-cnn``, ``mnist-cnn``,
``cifar10-cnn``) in :data:`advbench.registry.MODELS`; torchvision, timm and robustbench are
imported only when a loader that needs them is called.
"""

from advbench.models import zoo  # noqa: F401  (registers the zoo)
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
from advbench.models.zoo import ModelCard, load_zoo_model, model_card

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ModelCard",
    "Normalize",
    "load_import_path",
    "load_model_file",
    "load_robustbench",
    "load_timm",
    "load_torchvision",
    "load_zoo_model",
    "model_card",
    "with_normalization",
]
