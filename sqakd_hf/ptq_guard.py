"""Keep a PTQ weight/bias rewrite (GPTQ rounding, bias correction) only when it brings the model closer to its
full-precision function.

Both steps minimise a per-layer proxy: GPTQ the layer's summed squared output error, bias correction its mean
output shift. On transformers whose errors concentrate on a few tokens with massive activations the proxy can
disagree with the model's output: the compensation that serves those tokens is applied to every token (measured on
all-MiniLM-L6-v2: GPTQ with EWGS's zero-less W4 grid took the min cosine of the embeddings from 0.91 to 0.38; bias
correction of every linear under static per-tensor activations from 0.986 to 0.48). So calibration measures the
model's relative output error ``||f_q(x) - f(x)||^2 / ||f(x)||^2`` on (up to) its first calibration batches before
and after each step, and undoes the step when the error grew.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from .injection import named_quantizers
from .model_io import first_float_tensor
from .process_group import all_reduce_
from .quantizers.base import bypassing

logger = logging.getLogger(__name__)

#: calibration batches the output error is measured on (the reference outputs are kept in memory)
PROBE_BATCHES = 2


class OutputErrorProbe:
    """The model's relative output error against the full-precision function it had when the probe was made."""

    def __init__(self, model: nn.Module, batches: List[Any], forward: Callable[[nn.Module, Any], Any]) -> None:
        self.model, self.forward = model, forward
        self.batches = batches[:PROBE_BATCHES]  # already on the model's device (calibrate moved them)
        with bypassing(q for _, q in named_quantizers(model)):
            self.reference = self._outputs()
        self.last: Optional[float] = None  # the error of the model as it is now, once measured

    @torch.no_grad()
    def _outputs(self) -> List[Optional[Tensor]]:
        was_training = self.model.training
        self.model.eval()
        try:
            return [first_float_tensor(self.forward(self.model, b)) for b in self.batches]
        finally:
            self.model.train(was_training)

    def error(self) -> float:
        """``sum ||f_q - f||^2 / sum ||f||^2`` over the probe batches (all-reduced over processes)."""
        sums = torch.zeros(2, dtype=torch.float64, device=next(self.model.parameters()).device)
        for out, ref in zip(self._outputs(), self.reference):
            if out is None or ref is None or out.shape != ref.shape:
                continue
            sums[0] += (out.double() - ref.double()).square().sum()
            sums[1] += ref.double().square().sum()
        all_reduce_(sums)
        self.last = float(sums[0] / sums[1]) if sums[1] > 0 else 0.0
        return self.last


def keep_if_better(probe: OutputErrorProbe, step: str, tensors: Dict[str, Tensor], run: Callable[[], Any]) -> bool:
    """Run ``run()`` (which may modify ``tensors`` in place); if the model's output error grew, copy the saved
    values back and return False (with a warning naming ``step`` and both errors)."""
    saved = {name: t.detach().clone() for name, t in tensors.items()}
    before = probe.error() if probe.last is None else probe.last
    run()
    after = probe.error()
    if after <= before:
        logger.info("sqakd: %s kept: relative output error on the calibration batches %.3g -> %.3g",
                    step, before, after)
        return True
    with torch.no_grad():
        for name, t in tensors.items():
            t.copy_(saved[name])
    probe.last = before
    logger.warning("sqakd: %s was undone: it raised the model's relative output error on the calibration batches "
                   "(%.4g -> %.4g)", step, before, after)
    return False
