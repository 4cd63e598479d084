"""Random resizing and padding (Xie, Wang, Zhang, Ren & Yuille, ICLR 2018)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from advbench import params
from advbench.defenses.base import InputTransform
from advbench.errors import ConfigError
from advbench.registry import DEFENSES

Mode = Literal["nearest", "bilinear"]
MODES = get_args(Mode)


def default_pad_size(size: int) -> int:
    """The smallest multiple of 8 above ``size``: 28 -> 32 (MNIST), 32 -> 40 (CIFAR-10), 8 -> 16."""
    return 8 * (size // 8 + 1)


@DEFENSES.register("randomization", description="Random resizing and zero padding (Xie et al. 2018); randomized")
class Randomization(InputTransform):
    """Random resizing and padding (Xie et al. 2018), one independent draw per example.

    Each image is resized to r x r, r drawn uniformly from the integers [min_size, pad_size),
    then placed at a uniformly drawn position (top, left each in [0, pad_size - r], both ends
    included) on a pad_size x pad_size canvas of ``pad_value``. Xie et al. use r in [299, 331)
    padded to 331 for 299-pixel ImageNet inputs. Defaults, from the input's size
    s = max(H, W): ``min_size = s`` and ``pad_size`` the smallest multiple of 8 above s
    (28 -> [28, 32) padded to 32; 32 -> [32, 40) padded to 40; 8 -> [8, 16) padded to 16).

    ``pad_value`` defaults to 0 (zero padding, the background of MNIST-like data); Xie et al.
    pad with 0 on inputs scaled to [-1, 1], which is 0.5 here (Athalye et al.'s choice).

    ``mode="nearest"`` (default) resizes by nearest neighbour as Xie et al.'s implementation
    does (here PyTorch's ``nearest-exact``, sampling at pixel centres) and keeps pixel values;
    ``"bilinear"`` is smoother. Either way the map is, for fixed draws, linear in the input, so
    autograd's gradient is the true one (``differentiable``); the randomness is why an attack
    needs EoT (``randomized``).

    Deviation: the paper's classifier is fully convolutional and takes the larger image. With
    ``resize_back=True`` (default) the padded image is area-resized (averaged) back to the
    input's H x W so that any classifier works; ``resize_back=False`` keeps the paper's
    pad_size x pad_size output (see :meth:`output_size`).
    """

    differentiable: ClassVar[bool] = True
    randomized: ClassVar[bool] = True

    class Params(params.Params):
        min_size: params.Count | None = None  # None: the input's size
        pad_size: params.Count | None = None  # None: the smallest multiple of 8 above min_size
        resize_back: Annotated[bool, Field(strict=True)] = True
        mode: Mode = "nearest"
        pad_value: Annotated[params.UnitInterval, Field(strict=True)] = 0.0

        @model_validator(mode="after")
        def _pad_above_min(self) -> Randomization.Params:
            if self.min_size is not None and self.pad_size is not None and self.pad_size <= self.min_size:
                raise ValueError(f"pad_size must be larger than min_size (r is drawn from [min_size, pad_size)), "
                                 f"got min_size={self.min_size}, pad_size={self.pad_size}")
            return self

    def sizes(self, height: int, width: int) -> tuple[int, int]:
        """(min_size, pad_size) for an input of ``height`` x ``width``: r is drawn from [min_size, pad_size)."""
        low = self.min_size if self.min_size is not None else max(height, width)
        high = self.pad_size if self.pad_size is not None else default_pad_size(low)
        if high <= low:
            raise ConfigError(f"pad_size must be larger than min_size, got min_size={low}, pad_size={high}")
        return low, high

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The (H, W) the classifier sees for an input of ``height`` x ``width``."""
        if self.resize_back:
            return height, width
        pad = self.sizes(height, width)[1]
        return pad, pad

    def draw(self, n: int, height: int, width: int, generator: torch.Generator | None,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-example (r, top, left), int64 on ``device``: r, then the offsets, from ``generator``."""
        low, high = self.sizes(height, width)
        dev = generator.device if generator is not None else device
        r = torch.randint(low, high, (n,), generator=generator, device=dev)
        u = torch.rand(2, n, generator=generator, device=dev)
        room = (high - r + 1).float()
        top, left = (u * room).floor().long().minimum(high - r)  # uniform on {0, ..., high - r}
        return r.to(device), top.to(device), left.to(device)

    def transform(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, c, h, w = x.shape
        pad = self.sizes(h, w)[1]
        r, top, left = self.draw(n, h, w, generator, x.device)
        # resize each group of equal r at once and paste it at the canvas's top-left corner
        canvas = x.new_zeros(n, c, pad, pad)
        interp = {"mode": "nearest-exact"} if self.mode == "nearest" else {"mode": "bilinear", "align_corners": False}
        for size in r.unique().tolist():
            idx = (r == size).nonzero().squeeze(1)
            resized = F.interpolate(x.index_select(0, idx), size=(size, size), **interp)
            canvas = canvas.index_copy(0, idx, F.pad(resized, (0, pad - size, 0, pad - size)))
        # then shift every image by its own (top, left): out[i, j] = canvas[i - top, j - left] inside, pad_value outside
        pos = torch.arange(pad, device=x.device)
        rows, cols = pos - top[:, None], pos - left[:, None]  # (n, pad)
        rows_in, cols_in = (rows >= 0) & (rows < r[:, None]), (cols >= 0) & (cols < r[:, None])
        out = canvas.gather(2, rows.clamp(min=0).view(n, 1, pad, 1).expand(n, c, pad, pad))
        out = out.gather(3, cols.clamp(min=0).view(n, 1, 1, pad).expand(n, c, pad, pad))
        inside = rows_in.view(n, 1, pad, 1) & cols_in.view(n, 1, 1, pad)
        out = torch.where(inside, out, out.new_tensor(self.pad_value))
        if self.resize_back and (pad, pad) != (h, w):
            out = F.interpolate(out, size=(h, w), mode="area")
        return out
