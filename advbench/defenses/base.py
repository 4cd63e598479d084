"""Inference-time defenses as input transformations, the defended model, and its adaptive view.

A defense that acts at inference time is an :class:`InputTransform`: a map of a batch in the
threat model's bounds to the classifier's input (JPEG compression, bit-depth reduction, median
smoothing, random resizing and padding, thermometer encoding, ...). It declares two tags the
evaluator reads:

- ``differentiable``: autograd's gradient of :meth:`InputTransform.transform` is the true,
  useful gradient. False for quantizers, codecs and other piecewise-constant maps, whose
  gradient is zero or undefined; those give BPDA a differentiable :meth:`surrogate`
  (identity unless they know better, e.g. thermometer encoding's soft ramp).
- ``randomized``: each call draws new randomness (from the ``generator`` it is given).

:class:`DefendedModel` is the deployed model: the stages in order, then the classifier. Its
forward pass is the real one; where a stage is not differentiable the gradient autograd gives
is what a *naive* attacker sees (zero where the computation has none). :func:`adaptive` returns
the view an *adaptive* attacker should attack (Athalye, Carlini & Wagner 2018):

- **BPDA**: every non-differentiable stage runs for real in the forward pass, and the backward
  pass goes through its surrogate: ``s(x) + (t(x) - s(x)).detach()`` has the value ``t(x)``
  and the gradient of ``s``; chained stages compose by the chain rule, each at its own input.
- **EoT**: a randomized model is evaluated on ``eot_samples`` independent draws in one batch
  and the view returns the mean of the logits; the gradient is therefore the average over draws
  of each draw's gradient, taken at the averaged logits (exactly the average of the per-draw
  gradients for any loss linear in the logits, such as a margin between fixed classes).

Randomness: a defended model owns a ``torch.Generator`` (seeded by ``seed``) for its draws, so
a seed fixes every result on CPU; :meth:`DefendedModel.reseed` restarts it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from advbench import params
from advbench.errors import ConfigError


class InputTransform(params.Configurable, ABC):
    """One inference-time defense stage: ``transform`` (real), ``surrogate`` (for BPDA), tags.

    Subclasses declare their parameters once, as a nested ``Params`` class
    (:mod:`advbench.params`); the keyword arguments are validated through it and kept as
    attributes of the same name (``params()`` reads them back). They implement :meth:`transform`.
    """

    plugin_kind: ClassVar[str] = "defense"
    name: ClassVar[str] = "transform"
    #: autograd's gradient of ``transform`` is the true one (else BPDA uses ``surrogate``)
    differentiable: ClassVar[bool] = True
    #: each call draws fresh randomness from the generator it is given
    randomized: ClassVar[bool] = False

    @abstractmethod
    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The real transformation of a batch (N, C, H, W) in [0, 1]; draws from ``generator``."""

    def surrogate(self, x: torch.Tensor) -> torch.Tensor:
        """A differentiable approximation of ``transform`` for BPDA (identity by default)."""
        return x

    def out_channels(self, channels: int) -> int:
        """Channels of the output for ``channels`` input channels (the classifier's input)."""
        return channels


class DefendedModel(nn.Module):
    """``classifier(stage_n(... stage_1(x)))``: the deployed defended model, real forward pass.

    A classifier that is itself a DefendedModel is flattened into one chain (so a defense
    applied on top of a thermometer-encoded model keeps the whole chain visible to BPDA/EoT).
    """

    def __init__(self, stages: Sequence[InputTransform], classifier: nn.Module, seed: int = 0) -> None:
        super().__init__()
        stages = list(stages)
        for s in stages:
            if not isinstance(s, InputTransform):
                raise ConfigError(f"a defense stage must be an InputTransform, got {type(s).__name__}")
        if isinstance(classifier, DefendedModel):
            stages, classifier = stages + classifier.stages, classifier.classifier
        self.stages: list[InputTransform] = stages
        self.classifier = classifier
        self.seed = seed
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)

    # ------------------------------------------------------------------ tags
    @property
    def differentiable(self) -> bool:
        return all(s.differentiable for s in self.stages)

    @property
    def randomized(self) -> bool:
        return any(s.randomized for s in self.stages)

    def describe(self) -> str:
        return " -> ".join([*(repr(s) for s in self.stages), type(self.classifier).__name__])

    def reseed(self, seed: int | None = None) -> None:
        """Restart the draws (from ``seed``, else the model's own)."""
        self.seed = self.seed if seed is None else seed
        self._generator_for(torch.device("cpu")).manual_seed(self.seed)
        if hasattr(self, "_device_generator"):
            del self._device_generator

    def _generator_for(self, device: torch.device) -> torch.Generator:
        """The model's generator on ``device`` (a CUDA generator is seeded once from the CPU one)."""
        if device.type == "cpu":
            return self.generator
        gen = getattr(self, "_device_generator", None)
        if gen is None or gen.device != device:
            gen = torch.Generator(device=device)
            gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.generator)))
            self._device_generator = gen
        return gen

    # ------------------------------------------------------------------ forward
    def preprocess(self, x: torch.Tensor, mode: str = "real") -> torch.Tensor:
        """The chain of stages: ``real`` (deployed forward, autograd's own gradient) or ``bpda``
        (same values, gradients of the surrogates of non-differentiable stages)."""
        gen = self._generator_for(x.device) if self.randomized else None
        for s in self.stages:
            out = s.transform(x, gen)
            if mode == "bpda" and not s.differentiable and torch.is_grad_enabled() and x.requires_grad:
                sur = s.surrogate(x)
                out = sur + (out.detach() - sur.detach())
            elif mode == "real" and torch.is_grad_enabled() and x.requires_grad and not out.requires_grad:
                out = out + 0.0 * x.sum()  # a naive attacker's gradient here is zero, not an error
            x = out
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.preprocess(x, "real"))


class AdaptiveModel(nn.Module):
    """The adaptive attacker's view of a :class:`DefendedModel`: BPDA and EoT (module docstring).

    Only attacks see this view; the audit and the reported predictions use the deployed model.
    """

    def __init__(self, model: DefendedModel, *, eot_samples: int = 1, bpda: bool = True) -> None:
        super().__init__()
        params.check_whole(eot_samples, "eot_samples", 1)
        self.model = model
        self.eot_samples = eot_samples if model.randomized else 1
        self.bpda = bpda and not model.differentiable

    @property
    def passes_per_input(self) -> int:
        """Classifier passes per input: EoT runs every input ``eot_samples`` times (the access
        handles count passes per example, so they multiply by this)."""
        return self.eot_samples

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = "bpda" if self.bpda else "real"
        n = self.eot_samples
        if n == 1:
            return self.model.classifier(self.model.preprocess(x, mode))
        batch = x.shape[0]
        logits = self.model.classifier(self.model.preprocess(x.repeat(n, *([1] * (x.dim() - 1))), mode))
        return logits.view(n, batch, *logits.shape[1:]).mean(dim=0)

    def describe(self) -> str:
        parts = (["BPDA"] if self.bpda else []) + ([f"EoT x{self.eot_samples}"] if self.eot_samples > 1 else [])
        return " + ".join(parts) or "none"


def find_defended(model: nn.Module) -> DefendedModel | None:
    """The DefendedModel ``model`` is or wraps directly (through ``.model`` attributes), else None."""
    seen = 0
    while model is not None and seen < 8:
        if isinstance(model, DefendedModel):
            return model
        model = getattr(model, "model", None)
        seen += 1
    return None


def adaptive(model: nn.Module, *, eot_samples: int = 1, bpda: bool = True) -> nn.Module:
    """The adaptive view of ``model``: :class:`AdaptiveModel` for a DefendedModel that needs one
    (a non-differentiable or randomized stage), else ``model`` itself."""
    if isinstance(model, DefendedModel) and (not model.differentiable or model.randomized):
        return AdaptiveModel(model, eot_samples=eot_samples, bpda=bpda)
    return model


def needs_adaptive(model: nn.Module) -> bool:
    """Whether attacking ``model`` naively can mislead: it has a non-differentiable or randomized stage."""
    return isinstance(model, DefendedModel) and (not model.differentiable or model.randomized)

