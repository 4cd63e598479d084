"""Image distances between LST outputs and their targets (the paper's Table 1).

RMSE and L-inf are computed per image; SSIM is scikit-image's ``structural_similarity``; LPIPS
is the ``lpips`` package's AlexNet variant, used only when the AlexNet backbone weights are on
this machine (nothing is ever downloaded). When they are not, :class:`LPIPSDistance` reports
NaN and says why in ``note``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from advbench.errors import ConfigError
from advbench.similarity import ssim, ssim_settings  # noqa: F401  (the tables' SSIM is the audit's)

#: torchvision's file name for the ImageNet AlexNet weights LPIPS builds on
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
#: LPIPS's AlexNet was calibrated on 64x64 patches; smaller images are upsampled to this side
LPIPS_MIN_SIDE = 64


def rmse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Root mean squared error per image (over all pixels and channels)."""
    return (x - y).double().pow(2).flatten(1).mean(dim=1).sqrt().float()


def linf(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Largest absolute pixel difference per image."""
    return (x - y).abs().flatten(1).amax(dim=1)


# ---------------------------------------------------------------------- LPIPS
def find_alexnet_weights(path: str | os.PathLike[str] | None = None) -> tuple[Path | None, str]:
    """The AlexNet weights file to use and a note: ``path`` if given, else torch hub's checkpoint folder.

    A ``path`` that does not exist is a :class:`ConfigError` (the user asked for it); a missing
    file in the hub folder is not an error, only a reason to skip LPIPS.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"lpips_weights: no AlexNet weights file at {p}")
        return p, f"AlexNet weights from {p}"
    hub = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
    if hub.is_file():
        return hub, f"AlexNet weights from {hub}"
    return None, (
        f"LPIPS skipped (NaN): the AlexNet backbone weights ({ALEXNET_FILE}) are not on this machine and are "
        f"never downloaded; to enable it, copy the file to {hub.parent} or give its path as 'lpips_weights' "
        f"in the config"
    )


class LPIPSDistance:
    """LPIPS (AlexNet, v0.1) between image batches in [0, 1], or NaN with a note when unavailable.

    Grey images are repeated to three channels; images smaller than 64x64 are upsampled
    (bilinear) to 64 on their short side, since AlexNet's pooling cannot take 28x28 or 8x8 inputs.
    """

    def __init__(self, weights: str | os.PathLike[str] | None = None, *, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.net: Any = None
        path, note = find_alexnet_weights(weights)
        self.note = note
        if path is None:
            return
        try:
            import lpips
        except ImportError:
            self.note = "LPIPS skipped (NaN): the 'lpips' package is not installed (pip install lpips)"
            return
        self.net = _build_lpips(lpips, path).to(self.device)
        self.note = f"LPIPS (AlexNet, v0.1) with {note}; images under {LPIPS_MIN_SIDE} px upsampled (bilinear)"

    @property
    def available(self) -> bool:
        return self.net is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
        if not self.available:
            return torch.full((x.shape[0],), float("nan"))
        out = []
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                a = _prepare(x[start : start + batch_size].to(self.device))
                b = _prepare(y[start : start + batch_size].to(self.device))
                out.append(self.net(a, b, normalize=True).flatten().float().cpu())
        return torch.cat(out)


def _prepare(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    side = min(x.shape[2], x.shape[3])
    if side < LPIPS_MIN_SIDE:
        scale = LPIPS_MIN_SIDE / side
        size = (round(x.shape[2] * scale), round(x.shape[3] * scale))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x


def _build_lpips(lpips: Any, path: Path) -> torch.nn.Module:
    """LPIPS with a randomly initialized backbone (no download), then the local AlexNet weights loaded into it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise ConfigError(f"lpips_weights: cannot read {path} as a torch state dict ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    mapped = {}
    for key in net.net.state_dict():  # e.g. "slice2.3.weight" <- torchvision's "features.3.weight"
        _slice, index, param = key.split(".")
        src = f"features.{index}.{param}"
        if src not in state:
            raise ConfigError(f"lpips_weights: {path} is not torchvision AlexNet weights (no {src!r})")
        mapped[key] = state[src]
    try:
        net.net.load_state_dict(mapped)
    except RuntimeError as exc:
        raise ConfigError(f"lpips_weights: {path} does not fit AlexNet: {' '.join(str(exc).split())[:200]}") from None
    return net.eval()
