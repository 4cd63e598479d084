"""Thermometer encoding (Buckman, Roy, Raffel & Goodfellow, ICLR 2018) and its BPDA surrogate."""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
from pydantic import Field

from advbench import params
from advbench.defenses.base import InputTransform
from advbench.registry import DEFENSES


@DEFENSES.register("thermometer", description="Thermometer encoding (Buckman et al. 2018); BPDA through the soft ramp")
class Thermometer(InputTransform):
    """Thermometer encoding with ``levels`` = l bits per channel (Buckman et al. 2018).

    Hard encoding, for k = 0, ..., l - 1 (the convention of Athalye, Carlini & Wagner 2018,
    Sec. 5.1, with k counted from 0)::

        tau(x)_k = 1 if x > k / l else 0

    so a value x in [0, 1] sets its first ceil(l * x) bits: 0 -> all zeros, 1 -> all ones.
    (Athalye et al.'s example tau(0.66) = 1111110000 for l = 10 counts k from 1, which wastes
    the last bit, x > 1, on a constant; from 0 the first bit separates x = 0 from x > 0.)

    BPDA surrogate, the soft thermometer (Athalye et al.'s ``min(max(x - k/l, 0), 1)`` with the
    ramp scaled to one level's width so that it spans [k/l, (k+1)/l])::

        s(x)_k = min(max(l * x - k, 0), 1),   tau(x)_k = ceil(s(x)_k)

    s equals tau exactly at every level boundary x = j / l and everywhere outside the one ramp
    k = floor(l * x) a value sits on; sum_k s(x)_k = l * x (the soft code counts the value).
    Unscaled, the paper's ramp has slope 1 over [k/l, 1] and never reaches 1 for k > 0.

    Channel layout (channel-major): output channel ``c * l + k`` is bit k of input channel c,
    so ``out_channels(C) = C * l``; the classifier must take C * l input channels.
    """

    differentiable: ClassVar[bool] = False
    randomized: ClassVar[bool] = False

    class Params(params.Params):
        levels: Annotated[params.Count, Field(ge=2, le=1024)] = 16

    def _ramp(self, x: torch.Tensor) -> torch.Tensor:
        """``l * x - k`` as (N, C, l, H, W)."""
        k = torch.arange(self.levels, device=x.device, dtype=x.dtype).view(1, 1, -1, 1, 1)
        return x.unsqueeze(2) * self.levels - k

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Hard code: bit k of channel c at output channel ``c * levels + k``."""
        return (self._ramp(x) > 0).to(x.dtype).flatten(1, 2)

    def surrogate(self, x: torch.Tensor) -> torch.Tensor:
        """Soft code ``clamp(l * x - k, 0, 1)``, same layout, with its derivative defined at the kinks.

        autograd's clamp has derivative 0 at the ends of its range, and every value on the 1/l
        grid (0 and 1 included, and every digits pixel) sits at the end of two ramps, which would
        give BPDA no gradient there. Here each ramp's derivative is l inside it and l / 2 at its
        ends (the mean of the one-sided derivatives), so a value on the grid moves both ways.
        """
        r = self._ramp(x)
        weight = ((r >= 0) & (r <= 1)).to(r.dtype) - 0.5 * ((r == 0) | (r == 1)).to(r.dtype)
        return (r.clamp(0, 1).detach() + (r - r.detach()) * weight).flatten(1, 2)

    def out_channels(self, channels: int) -> int:
        return channels * self.levels
