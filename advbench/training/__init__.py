"""Training defended models: ``advbench train CONFIG.yaml``, and loading the result by name.

=====================  ===================================================================
module                 job
=====================  ===================================================================
``config``             the train config schema (YAML, pydantic, one-line ConfigErrors)
``recipes``            the recipes: plain, madry, fast, trades, distillation, thermometer
``perturb``            adversarial examples for training (PGD, FGSM + random start, TRADES)
``loop``               seeded epochs, checkpoint every epoch, resume, progress bar (also
                       what trains the zoo's reference models)
``measure``            clean and PGD robust accuracy on the evaluation split
``card``               the model card and its summary
``save``               writing ``<ADVBENCH_CACHE>/trained/<name>/`` (read by :mod:`advbench.models.trained`)
``run``                :func:`train`: all of the above, under a lock
=====================  ===================================================================

A trained model is evaluated by name with a ModelSpec ``trained`` entry::

    models:
      - {name: digits-madry, trained: digits-madry}
"""

from __future__ import annotations

from advbench.training.config import TrainConfig, load_train_config, parse_train_config
from advbench.training.recipes import RECIPES, make_recipe
from advbench.training.run import TrainResult, train
from advbench.models.trained import load_trained, read_card, trained_dir

__all__ = [
    "RECIPES",
    "TrainConfig",
    "TrainResult",
    "load_train_config",
    "load_trained",
    "make_recipe",
    "parse_train_config",
    "read_card",
    "train",
    "trained_dir",
]
