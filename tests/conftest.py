"""Shared test setup: offline Hub, one CPU thread (stable timings on a shared 2-core box),
and a small CNN teacher trained on scikit-learn's real digits (labels used for the teacher only)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(1)


class DigitsCNN(nn.Module):
    """A timm-style plain module: ``forward(x)`` takes a (B, 1, 8, 8) tensor and returns logits."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()

        def block(i: int, o: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

        self.features = nn.Sequential(block(1, width), block(width, width), block(width, 2 * width, 2), block(2 * width, 2 * width))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


@pytest.fixture(scope="session")
def digits():
    """Real 8x8 digits in [0, 1], (N, 1, 8, 8); stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target, test_size=0.25, random_state=0, stratify=d.target)
    return torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item() * 100
    model.train(was)
    return acc


@pytest.fixture(scope="session")
def digits_teacher(digits):
    """A DigitsCNN trained with labels (the teacher; ~98.7% held-out), in eval mode."""
    x_tr, y_tr, _, _ = digits
    torch.manual_seed(0)
    model = DigitsCNN()
    epochs, bs = 30, 64
    opt = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=epochs * ((len(x_tr) + bs - 1) // bs))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x_tr))
        for i in range(0, len(perm), bs):
            idx = perm[i : i + bs]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()
