"""The reference models (``digits-mlp``, ``digits-cnn``, ``mnist-cnn``, ``cifar10-cnn``): shipped
trained, registered in :data:`advbench.registry.MODELS` on import (:mod:`advbench.zoo.reference`)."""

from advbench.zoo.reference import (
    SHIPPED_DIR,
    SHIPPED_ENV,
    ZOO,
    ModelCard,
    Recipe,
    ZooSpec,
    load_zoo_model,
    model_card,
    recipe_hash,
    select_recipe,
    shipped_path,
    train_zoo_model,
    verify_recipe,
    zoo_names,
)

__all__ = [
    "SHIPPED_DIR",
    "SHIPPED_ENV",
    "ZOO",
    "ModelCard",
    "Recipe",
    "ZooSpec",
    "load_zoo_model",
    "model_card",
    "recipe_hash",
    "select_recipe",
    "shipped_path",
    "train_zoo_model",
    "verify_recipe",
    "zoo_names",
]
