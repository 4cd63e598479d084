"""Shared fixtures: the digits data and small models trained on it in about a second."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("ADVBENCH_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "advbench"))

# One intra-op thread: the models here are tiny, and on a shared 2-core machine two OpenMP
# threads per process slow them 5-8x while other work runs (and results stay bit-identical).
torch.set_num_threads(1)

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for idx in perm.split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def digits_train():
    from advbench.data.digits import load_digits

    return load_digits("train")


@pytest.fixture(scope="session")
def digits_test():
    from advbench.data.digits import load_digits

    return load_digits("test")


@pytest.fixture(scope="session")
def digits_mlp(digits_train) -> nn.Module:
    """A 64-128-10 MLP, about 97% clean accuracy on the digits test split."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    return _train(model, digits_train.x, digits_train.y, epochs=30, seed=0)


@pytest.fixture(scope="session")
def digits_cnn(digits_train) -> nn.Module:
    """A small CNN on 1x8x8 digits."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10),
    )
    return _train(model, digits_train.x, digits_train.y, epochs=15, seed=1)


@pytest.fixture(scope="session")
def shared_data() -> str:
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA
