"""The reference architectures, and building them: seeded, widened to more input channels, or
rebuilt from the description saved beside a trained model.

Four networks, each taking [0, 1] input with its normalization as the first layer:

=============== ========= ===============================================================
name            input     network
=============== ========= ===============================================================
``digits-mlp``  1x8x8     MLP 64-128-10
``digits-cnn``  1x8x8     conv3x3(16)-conv3x3(32)-maxpool-fc64-fc10
``mnist-cnn``   1x28x28   LeNet-like: conv5x5(16)-pool-conv5x5(32)-pool-fc128-fc10
``cifar10-cnn`` 3x32x32   3x[conv3x3-BN-ReLU-maxpool] (16, 32, 64 channels)-fc10
=============== ========= ===============================================================

The zoo (:mod:`advbench.zoo`) trains them with its recipes; ``advbench train`` trains them with
defended recipes. A thermometer-encoded classifier takes ``C * levels`` channels, so
:func:`build_classifier` replaces the input layer of the network:

- the leading :class:`~advbench.models.layers.Normalize` (pixel statistics, meaningless for
  {0, 1} codes) becomes ``Normalize(0.5, 0.5)``, mapping the bits to {-1, 1};
- the first ``Conv2d`` (or, for an MLP, the first ``Linear``) gets ``in_channels`` inputs
  (``Linear``: ``in_features * in_channels / C``), freshly initialized from the seed.

Everything else is the network's layers, untouched, so a trained model's saved description is
just the architecture name and ``in_channels``; :func:`rebuild` builds the same module tree.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from advbench.defenses.base import DefendedModel
from advbench.errors import ConfigError, unknown_name
from advbench.models.layers import CIFAR10_MEAN, CIFAR10_STD, MNIST_MEAN, MNIST_STD, Normalize, conv_bn_relu
from advbench.registry import DEFENSES

DIGITS_MEAN = (0.3,)  # the UCI digits' pixel statistics (scaled to [0, 1]), rounded
DIGITS_STD = (0.38,)


def _digits_mlp() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            normalize=Normalize(DIGITS_MEAN, DIGITS_STD),
            flatten=nn.Flatten(),
            fc1=nn.Linear(64, 128),
            relu1=nn.ReLU(),
            fc2=nn.Linear(128, 10),
        )
    )


def _digits_cnn() -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            normalize=Normalize(DIGITS_MEAN, DIGITS_STD),
            conv1=nn.Conv2d(1, 16, 3, padding=1),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(16, 32, 3, padding=1),
            relu2=nn.ReLU(),
            pool=nn.MaxPool2d(2),  # 32x4x4
            flatten=nn.Flatten(),
            fc1=nn.Linear(32 * 4 * 4, 64),
            relu3=nn.ReLU(),
            fc2=nn.Linear(64, 10),
        )
    )


def _mnist_cnn() -> nn.Module:
    """LeNet-like: two 5x5 conv + max-pool stages, then two fully connected layers."""
    return nn.Sequential(
        OrderedDict(
            normalize=Normalize(MNIST_MEAN, MNIST_STD),
            conv1=nn.Conv2d(1, 16, 5, padding=2),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),  # 16x14x14
            conv2=nn.Conv2d(16, 32, 5, padding=2),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),  # 32x7x7
            flatten=nn.Flatten(),
            fc1=nn.Linear(32 * 7 * 7, 128),
            relu3=nn.ReLU(),
            fc2=nn.Linear(128, 10),
        )
    )


def _cifar10_cnn() -> nn.Module:
    """Three conv-BN-ReLU-pool stages (16, 32, 64 channels) and a linear classifier."""
    return nn.Sequential(
        OrderedDict(
            normalize=Normalize(CIFAR10_MEAN, CIFAR10_STD),
            block1=conv_bn_relu(3, 16, pool=True),  # 16x16x16
            block2=conv_bn_relu(16, 32, pool=True),  # 32x8x8
            block3=conv_bn_relu(32, 64, pool=True),  # 64x4x4
            flatten=nn.Flatten(),
            fc=nn.Linear(64 * 4 * 4, 10),
        )
    )


@dataclass(frozen=True)
class Architecture:
    """A reference network: how to build it and what it takes."""

    name: str
    build: Callable[[], nn.Module]
    description: str
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int = 10
    arch_version: int = 1  # bump when the network changes: trained weights of the old one no longer fit


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("digits-mlp", _digits_mlp, "MLP 64-128-10 (ReLU), normalization inside", (1, 8, 8),
                     DIGITS_MEAN, DIGITS_STD),
        Architecture("digits-cnn", _digits_cnn,
                     "CNN conv3x3(16)-conv3x3(32)-maxpool-fc64-fc10 (ReLU), normalization inside", (1, 8, 8),
                     DIGITS_MEAN, DIGITS_STD),
        Architecture("mnist-cnn", _mnist_cnn,
                     "LeNet-like CNN conv5x5(16)-pool-conv5x5(32)-pool-fc128-fc10 (ReLU), normalization inside",
                     (1, 28, 28), MNIST_MEAN, MNIST_STD),
        Architecture("cifar10-cnn", _cifar10_cnn,
                     "CNN 3x[conv3x3-BN-ReLU-maxpool] (16, 32, 64 channels)-fc10, normalization inside", (3, 32, 32),
                     CIFAR10_MEAN, CIFAR10_STD),
    )
}


def get(name: str) -> Architecture:
    """The architecture ``name`` (an UnknownNameError with close matches otherwise)."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise unknown_name("architecture", name, ARCHITECTURES) from None


def build(name: str, *, seed: int = 0) -> nn.Module:
    """A freshly initialized ``name`` in eval mode, its initialization fixed by ``seed`` (the global
    RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get(name).build()
    return model.eval()


def build_classifier(architecture: str, *, seed: int, in_channels: int | None = None) -> nn.Module:
    """The zoo ``architecture``, initialized from ``seed``, taking ``in_channels`` input channels
    (default: the zoo's own), in train mode."""
    spec = get(architecture)
    model = build(architecture, seed=seed)
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
    spec = get(architecture)
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
    return DEFENSES.create(entry["name"], **entry.get("params", {}))


def build_deployed(architecture: str, *, seed: int, in_channels: int | None = None,
                   stages: list[dict[str, Any]] | None = None) -> nn.Module:
    """A fresh deployed model (train mode): :func:`build_classifier`, behind the defense stages
    ``stages`` describes (``{"name", "params"}`` each) when there are any."""
    classifier = build_classifier(architecture, seed=seed, in_channels=in_channels)
    built = [build_stage(s) for s in stages or []]
    return DefendedModel(built, classifier) if built else classifier


def rebuild(description: dict[str, Any]) -> nn.Module:
    """The (untrained) deployed model a :func:`describe` dict names: classifier, wrapped in its
    stages if it has any. Load the classifier's state dict into ``.classifier`` (or the model)."""
    if description.get("format") != 1:
        raise ConfigError(f"unknown trained-model description format {description.get('format')!r}")
    return build_deployed(description["architecture"], seed=0, in_channels=description.get("in_channels"),
                          stages=description.get("stages", []))


def classifier_of(model: nn.Module) -> nn.Module:
    """The trainable classifier of a deployed model (the model itself when it has no stages)."""
    return model.classifier if isinstance(model, DefendedModel) else model
