"""The trained models' architectures: the zoo's, optionally widened to more input channels.

The zoo (:mod:`advbench.models.zoo`) builds each architecture with its own input channels and
has no hook for others. A thermometer-encoded classifier takes ``C * levels`` channels, so
:func:`build_classifier` builds the zoo network and replaces its input layer:

- the leading :class:`~advbench.models.layers.Normalize` (pixel statistics, meaningless for
  {0, 1} codes) becomes ``Normalize(0.5, 0.5)``, mapping the bits to {-1, 1};
- the first ``Conv2d`` (or, for an MLP, the first ``Linear``) gets ``in_channels`` inputs
  (``Linear``: ``in_features * in_channels / C``), freshly initialized from the seed.

Everything else is the zoo's layers, untouched, so the saved description is just the zoo name
and ``in_channels``; :func:`build_classifier` rebuilds the same module tree from it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from advbench.errors import ConfigError
from advbench.models.layers import Normalize


def build_classifier(architecture: str, *, seed: int, in_channels: int | None = None) -> nn.Module:
    """The zoo ``architecture``, initialized from ``seed``, taking ``in_channels`` input channels
    (default: the zoo's own), in train mode."""
    from advbench.models import zoo

    spec = zoo.get_spec(architecture)
    model = zoo.build(architecture, seed=seed)
    c = spec.input_shape[0]
    if in_channels is not None and in_channels != c:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            _widen_input(model, c, in_channels)
    return model.train()


def _widen_input(model: nn.Module, channels: int, in_channels: int) -> None:
    """Replace the normalization and first weight layer of ``model`` in place (module docstring)."""
    if in_channels < 1:
        raise ConfigError(f"in_channels must be >= 1, got {in_channels}")
    for name, module in model.named_children():
        if isinstance(module, Normalize):
            setattr(model, name, Normalize(0.5, 0.5))
        elif isinstance(module, nn.Conv2d):
            setattr(
                model,
                name,
                nn.Conv2d(
                    in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                    padding=module.padding, dilation=module.dilation, groups=module.groups,
                    bias=module.bias is not None, padding_mode=module.padding_mode,
                ),
            )
            return
        elif isinstance(module, nn.Linear):
            if module.in_features % channels:
                break
            fan_in = module.in_features // channels * in_channels
            setattr(model, name, nn.Linear(fan_in, module.out_features, bias=module.bias is not None))
            return
        elif isinstance(module, nn.Sequential):
            _widen_input(module, channels, in_channels)
            return
    raise ConfigError(f"cannot find the input layer of {type(model).__name__} to widen it to {in_channels} channels")


def describe(architecture: str, in_channels: int | None, stages: list[dict[str, Any]]) -> dict[str, Any]:
    """How to rebuild a trained model: the JSON saved next to its state dict."""
    from advbench.models import zoo

    spec = zoo.get_spec(architecture)
    return {
        "format": 1,
        "architecture": architecture,
        "arch_version": spec.arch_version,
        "input_shape": list(spec.input_shape),
        "num_classes": spec.num_classes,
        "in_channels": in_channels,  # the classifier's input channels if not the zoo's (thermometer)
        "stages": stages,  # [{"name": registered defense, "params": {...}}], applied before the classifier
    }


def build_stage(entry: dict[str, Any]) -> Any:
    """An inference-time defense stage from its ``{"name", "params"}`` description."""
    import advbench.defenses
    import advbench.defenses.thermometer  # noqa: F401  (registers 'thermometer')
    from advbench.registry import DEFENSES

    return DEFENSES.create(entry["name"], **entry.get("params", {}))


def rebuild(description: dict[str, Any]) -> nn.Module:
    """The (untrained) deployed model a :func:`describe` dict names: classifier, wrapped in its
    stages if it has any. Load the classifier's state dict into ``.classifier`` (or the model)."""
    from advbench.defenses.base import DefendedModel

    if description.get("format") != 1:
        raise ConfigError(f"unknown trained-model description format {description.get('format')!r}")
    classifier = build_classifier(description["architecture"], seed=0, in_channels=description.get("in_channels"))
    stages = [build_stage(s) for s in description.get("stages", [])]
    return DefendedModel(stages, classifier) if stages else classifier


def classifier_of(model: nn.Module) -> nn.Module:
    """The trainable classifier of a deployed model (the model itself when it has no stages)."""
    from advbench.defenses.base import DefendedModel

    return model.classifier if isinstance(model, DefendedModel) else model
