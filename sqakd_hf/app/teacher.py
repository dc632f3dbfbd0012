"""Training a small full-precision classifier with labels: the stand-in teacher of the quickstart and the
benchmark (the only place in the project where labels train a model)."""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..model_io import call_model, output_tensor

__all__ = ["train_classifier", "refresh_batchnorm"]


def train_classifier(
    model: nn.Module,
    columns: Dict[str, Tensor],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    weight_decay: float = 0.0,
    pct_start: float = 0.1,
    desc: Optional[str] = None,
) -> nn.Module:
    """Cross-entropy training on ``columns`` (equally long tensors, one of them ``labels``): AdamW with a
    one-cycle schedule over ``steps`` steps, batches drawn from seeded shuffles. ``desc`` shows a progress
    bar with that title. Returns the model in eval mode."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n = len(columns["labels"])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=pct_start)
    model.train()
    order = torch.empty(0, dtype=torch.long)
    with tqdm(total=steps, desc=desc, disable=desc is None) as bar:
        for step in range(steps):
            if len(order) < batch_size:
                order = torch.cat([order, torch.randperm(n, generator=gen)])
            idx, order = order[:batch_size], order[batch_size:]
            batch = {k: v[idx] for k, v in columns.items()}
            labels = batch.pop("labels")
            loss = F.cross_entropy(output_tensor(call_model(model, batch), "logits"), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if desc is not None and step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    return model.eval()


@torch.no_grad()
def refresh_batchnorm(model: nn.Module, x: Tensor, batch_size: int) -> None:
    """Recompute BatchNorm running statistics of the final weights (exact averages over ``x``); after a
    short, fast-moving run the running averages lag behind the weights."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for i in range(0, len(x), batch_size):
        model(x[i : i + batch_size])
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()
