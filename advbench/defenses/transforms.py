"""Input transformations: JPEG compression, bit-depth reduction and median smoothing.

JPEG (Dziugaite et al. 2016; Guo, Rana, Cisse & van der Maaten, ICLR 2018), bit-depth
reduction and median smoothing ("feature squeezing", Xu, Evans & Qi, NDSS 2018). Guo et al.'s
total-variance minimization is not included: it solves an optimization problem per image
(with a random pixel mask), which does not fit a cheap, vectorized stage.
"""

from __future__ import annotations

import io
from typing import Annotated, ClassVar

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from advbench import params
from advbench.defenses.base import InputTransform
from advbench.errors import ConfigError
from advbench.registry import DEFENSES

#: a JPEG quality, 1 (worst) to 100 (best), as Pillow takes it
Quality = Annotated[params.Count, Field(le=100)]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats to 8-bit levels, rounding to nearest (values outside are clipped)."""
    return x.detach().clamp(0, 1).mul(255).round().to(torch.uint8)


@DEFENSES.register("jpeg", description="JPEG compression (Guo et al. 2018); non-differentiable, BPDA identity")
class JPEG(InputTransform):
    """JPEG compression at ``quality`` (1-100, default 75, the usual libjpeg / Pillow default;
    Guo et al. 2018 use 75), a real encode and decode with Pillow (libjpeg).

    The image is rounded to 8-bit levels, encoded (grayscale for 1 channel; for 3, YCbCr with
    Pillow's default 4:2:0 chroma subsampling) and decoded back to [0, 1]; the codec runs on
    the CPU, one image at a time, whatever the input's device. Not differentiable (the gradient
    through rounding and the codec is zero or undefined); the BPDA surrogate is the identity,
    as Athalye et al. (2018) use for JPEG.
    """

    differentiable: ClassVar[bool] = False

    class Params(params.Params):
        quality: Quality = 75

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ConfigError(f"jpeg needs images with 1 (grayscale) or 3 (RGB) channels, got shape {tuple(x.shape)}")
        pixels = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, C)
        out = np.stack([self._codec(p) for p in pixels]) if len(pixels) else pixels
        return torch.from_numpy(out).to(device=x.device, dtype=x.dtype).permute(0, 3, 1, 2).div(255)

    def _codec(self, pixels: np.ndarray) -> np.ndarray:
        """One (H, W, C) uint8 image through a JPEG encode and decode."""
        image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=self.quality)
        buffer.seek(0)
        decoded = np.asarray(Image.open(buffer))
        return decoded.reshape(pixels.shape)


@DEFENSES.register("bit_depth", description="Bit-depth reduction (Xu et al. 2018); non-differentiable, BPDA identity")
class BitDepth(InputTransform):
    """Bit-depth reduction to ``bits`` bits per channel (feature squeezing, Xu et al. 2018)::

        x' = round(x * (2^bits - 1)) / (2^bits - 1)

    exactly 2^bits levels, equally spaced in [0, 1] and including both ends. Default 4: Xu et
    al.'s ImageNet setting, between their 1 bit for MNIST and 5 bits for CIFAR-10 (use 1 for
    MNIST-like data to reproduce theirs). Not differentiable (rounding's gradient is zero);
    the BPDA surrogate is the identity.
    """

    differentiable: ClassVar[bool] = False

    class Params(params.Params):
        bits: Annotated[params.Count, Field(le=8)] = 4

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        top = 2**self.bits - 1
        return x.clamp(0, 1).mul(top).round().div(top)


def _reflect_index(n: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    """Indices of a length-``n`` axis padded by half-sample symmetric reflection (d c b a | a b c d | d c),
    scipy.ndimage's ``mode="reflect"``; any pad width."""
    j = torch.arange(-before, n + after, device=device) % (2 * n)
    return torch.where(j < n, j, 2 * n - 1 - j)


@DEFENSES.register("median", description="Median smoothing (Xu et al. 2018); differentiable")
class Median(InputTransform):
    """Median smoothing over ``size`` x ``size`` windows, per channel (Xu et al. 2018; default 3).

    As ``scipy.ndimage.median_filter(x, size, mode="reflect")`` (what Xu et al. use): the
    window of pixel i spans [i - size // 2, i + (size - 1) // 2] (so 2 x 2 looks up and left),
    edges are padded by symmetric reflection, and an even window takes the upper of its two
    middle values (rank size^2 // 2, counted from 0).

    Differentiable: each output is one of its window's input pixels, so the map is piecewise a
    selection and autograd's gradient (1 on the selected pixel, through ``kthvalue``) is the true
    gradient wherever the window has no ties.
    """

    differentiable: ClassVar[bool] = True

    class Params(params.Params):
        size: Annotated[params.Count, Field(ge=2, le=15)] = 3

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        k = self.size
        _, _, h, w = x.shape
        before, after = k // 2, (k - 1) // 2
        xp = x.index_select(2, _reflect_index(h, before, after, x.device))
        xp = xp.index_select(3, _reflect_index(w, before, after, x.device))
        windows = xp.unfold(2, k, 1).unfold(3, k, 1).flatten(-2)  # (N, C, H, W, k * k)
        return windows.kthvalue(k * k // 2 + 1, dim=-1).values
