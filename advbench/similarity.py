"""Structural similarity (SSIM) per image pair: the perceptual bound a threat model may set
(``perceptual: {ssim: ...}``, enforced by :mod:`advbench.audit`) and the blind-spot tables' SSIM
column are one function, scikit-image's ``structural_similarity`` with the settings below."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from advbench.errors import ConfigError


def ssim_settings(height: int, width: int) -> dict[str, Any]:
    """Keyword arguments for ``structural_similarity``.

    Images at least 11 px on a side get the settings scikit-image documents as matching Wang et
    al. (2004), which torchmetrics (the reference code's SSIM) also uses: an 11x11 Gaussian
    window with sigma 1.5 and population covariances. Smaller images (8x8 digits) cannot hold that
    window and get scikit-image's default 7x7 uniform window (or the largest odd side that fits).
    """
    side = min(height, width)
    if side >= 11:
        return {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}
    if side < 3:
        raise ConfigError(f"SSIM needs images at least 3 px on a side, got {height}x{width}")
    return {"win_size": min(7, side if side % 2 else side - 1)}


def ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0) -> torch.Tensor:
    """SSIM per image pair (NCHW); grey images are compared as 2-D arrays, colour ones per channel."""
    from skimage.metrics import structural_similarity

    if x.shape != y.shape or x.dim() != 4:
        raise ConfigError(f"SSIM needs two NCHW batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    kw = ssim_settings(x.shape[2], x.shape[3])
    a = x.detach().cpu().double().numpy()
    b = y.detach().cpu().double().numpy()
    out = np.empty(x.shape[0])
    for i in range(x.shape[0]):
        if x.shape[1] == 1:
            out[i] = structural_similarity(a[i, 0], b[i, 0], data_range=data_range, channel_axis=None, **kw)
        else:
            out[i] = structural_similarity(
                np.moveaxis(a[i], 0, -1), np.moveaxis(b[i], 0, -1), data_range=data_range, channel_axis=-1, **kw
            )
    return torch.from_numpy(out).float()
