"""`SQAKDTrainingArguments`: `TrainingArguments` plus the distillation and quantizer knobs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Optional

from transformers import TrainingArguments

from .batchnorm import BN_POLICIES, check_bn_args
from .finite import NONFINITE_POLICIES
from .quantizer_lr import QUANTIZER_LR_MODES


DISTILL_TARGETS = ("logits", "hidden_states")
HIDDEN_LOSSES = ("mse", "cosine")
EWGS_DELTA_SCHEDULES = ("constant", "hessian")


@dataclass
class SQAKDTrainingArguments(TrainingArguments):
    """`TrainingArguments` for :class:`~sqakd_hf.SQAKDTrainer` (label-free quantization-aware distillation).

    Loss: ``kd_weight * T^2 KL(teacher || student) + ce_weight * CE(labels)``; the default
    (``ce_weight=0``) uses no labels at all. See the field docs for the rest.
    """

    temperature: float = field(
        default=4.0, metadata={"help": "Softmax temperature T of the KD loss (> 0); the loss is scaled by T^2."}
    )
    kd_weight: float = field(default=1.0, metadata={"help": "Weight of the distillation term (>= 0)."})
    ce_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the label cross-entropy term (>= 0). 0 (default) = label-free SQAKD."},
    )
    quantizer_learning_rate: Optional[float] = field(
        default=None,
        metadata={
            "help": "Learning rate of the quantizer parameters (steps, clip levels, intervals), their own optimizer "
            "group. None (default): the same as learning_rate. Its meaning follows quantizer_lr_mode: for a "
            "quantizer updated relatively it is the fraction of its own size by which each parameter moves per "
            "step (1e-4: about 0.01%%); for one updated absolutely the amount it moves (the SQAKD paper's CIFAR "
            "recipe: 1e-5 against 1e-3 for the weights)."
        },
    )
    quantizer_lr_mode: str = field(
        default="auto",
        metadata={
            "help": "How the optimizer's update d of a quantizer parameter p is applied. 'relative': "
            "p <- p * exp(sign(p) * d), about p + |p| d, so every quantizer parameter moves by about "
            "quantizer_learning_rate times its own size per step (to first order the optimizer's step on "
            "log|p|); steps and clip levels keep their sign. 'absolute': p <- p + d, the optimizer's plain "
            "(LSQ-style) update: Adam moves every parameter by about the lr per step, so an 8-bit weight step of "
            "~2e-3 drifts by its own size within ~100 steps at lr 2e-5 while a 2-bit step of ~0.1 barely moves. "
            "'auto' (default): relative for quantizers of 8 bits or more, absolute below. Measured on real "
            "weights: EfficientNet-Lite0 W8A8 LSQ from its PTQ model, 100 label-free steps at lr 1e-5, top-1 "
            "agreement with the teacher on 384 validation crops 95.3%% -> 96.9%% relative vs 95.6%% absolute "
            "(absolute dipped to 94.0%% mid-run); MiniLM W4A4 on 2000 held-out tweets, 150 steps at lr 5e-5: "
            "95.25%% absolute vs 94.65%% relative (coarse grids need their steps to move).",
            "choices": list(QUANTIZER_LR_MODES),
        },
    )
    quantizer_weight_decay: float = field(
        default=0.0, metadata={"help": "Weight decay of the quantizer parameters (default 0, as in the paper)."}
    )
    distill_target: str = field(
        default="logits",
        metadata={
            "help": "'logits': KL on the output distribution (per token for sequence outputs). 'hidden_states': "
            "match the last hidden state (for models without logits, e.g. embedding models); a different "
            "objective (MSE or cosine, see hidden_loss), not KL.",
            "choices": list(DISTILL_TARGETS),
        },
    )
    hidden_loss: str = field(
        default="mse",
        metadata={"help": "Loss for distill_target='hidden_states': 'mse' or 'cosine'.", "choices": list(HIDDEN_LOSSES)},
    )
    calibration_batches: int = field(
        default=4,
        metadata={
            "help": "Number of batches of training data (each the global batch of one optimizer step: per-device "
            "batch x gradient accumulation x processes) used to calibrate the quantizers before training. "
            "Skipped when every quantizer is already initialised (a quantized checkpoint, a resume)."
        },
    )
    ewgs_delta_schedule: Optional[str] = field(
        default=None,
        metadata={
            "help": "EWGS only. None or 'constant': delta stays at QuantConfig.ewgs_delta. 'hessian': every "
            "ewgs_delta_update_steps optimizer steps, delta = (Tr(H)/N) / (3 std(g)) per quantizer, with the "
            "Hessian trace of the KD loss estimated by Hutchinson's method (Lee et al., CVPR 2021).",
            "choices": [None, *EWGS_DELTA_SCHEDULES],
        },
    )
    ewgs_delta_update_steps: int = field(
        default=500, metadata={"help": "Optimizer steps between two EWGS delta updates (the first is at step 0)."}
    )
    ewgs_hessian_samples: int = field(
        default=8, metadata={"help": "Rademacher probes per Hutchinson Hessian-trace estimate."}
    )
    bn_policy: str = field(
        default="auto",
        metadata={
            "help": "BatchNorm running statistics of the student during training. 'auto' (default): 'frozen' when "
            "every quantized weight and activation has >= 8 bits, else 'train'. 'frozen': BN layers "
            "stay in eval mode, so the statistics the student starts with (the teacher's) are kept while BN "
            "weight/bias still train. 'train': statistics update every step (plain model.train()). "
            "'freeze_after': they update during the first bn_freeze_steps optimizer steps, then freeze. Default "
            "by measurement (bench/results/bn_policy.md): EfficientNet-Lite0 W8A8 LSQ, 40 label-free steps on "
            "crops of one photo, top-1 agreement with the teacher on crops of another: PTQ 0.91, frozen 0.93, "
            "train 0.19, freeze_after(10) 0.63 (train-mode BN normalises with the statistics of the few unlabeled "
            "images, which the teacher never saw). At low bits the quantized activations move away from the "
            "teacher's and BN must follow them: digits test_resnet, 30 SQAKD steps (bench/results/"
            "vision_quick_init_mse.md vs frozen): LSQ W2A2 86.1%% train vs 58.9%% frozen, EWGS W1A4 91.9%% vs 54.2%%, "
            "PACT W1A4 88.6%% vs 59.4%%; hence 'auto'. Models without BatchNorm: no effect.",
            "choices": list(BN_POLICIES),
        },
    )
    bn_freeze_steps: Optional[int] = field(
        default=None,
        metadata={"help": "bn_policy='freeze_after' only (required there, >= 1): optimizer steps during which BN "
                  "statistics update before they freeze."},
    )
    nonfinite: str = field(
        default="error",
        metadata={
            "help": "What a NaN/inf in training does (checked every step on the device, read at every log, save "
            "and evaluation). 'error': stop with an error naming the first bad step and the cause (inputs, "
            "teacher outputs, student outputs, loss). 'skip_batch': a batch with NaN/inf inputs or teacher outputs "
            "adds nothing (loss 0 in the logged average, no gradient) and is counted (logged as "
            "nonfinite_skipped_batches); NaN/inf student outputs or loss on clean data still stop training.",
            "choices": list(NONFINITE_POLICIES),
        },
    )
    nonfinite_max_skip_fraction: float = field(
        default=0.1,
        metadata={"help": "nonfinite='skip_batch': more skipped batches than this fraction of the run's is an error."},
    )
    cache_teacher_outputs: bool = field(
        default=False,
        metadata={
            "help": "Run the teacher once over the training data before training and read its outputs from disk in "
            "every epoch (and on resume) instead of running it at each step. For datasets without random "
            "augmentation only (checked: an error otherwise). Classifier logits and hidden states are stored in "
            "full (the loss is unchanged); per-token logits wider than teacher_cache_top_k as the top-k "
            "log-probabilities at the temperature plus the rest mass (the loss becomes the KL over those k+1 "
            "outcomes, an approximation of the full KL). Stored as safetensors in teacher_cache_dir."
        },
    )
    teacher_cache_top_k: int = field(
        default=64,
        metadata={"help": "cache_teacher_outputs: teacher tokens kept per position for per-token logits (>= 1); "
                  "a vocabulary no wider than this is stored in full."},
    )
    teacher_cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "cache_teacher_outputs: the cache folder (default: <output_dir>/_teacher_cache; the leading underscore keeps "
                  "the Trainer's Hub uploads of output_dir from sending it). A cache "
                  "built for another teacher, dataset, k or temperature is an error, not overwritten."},
    )

    fused_quantizers: Optional[bool] = field(
        default=None,
        metadata={"help": "Fused CPU kernels (torch.compile, inductor's C++ backend) for the fake-quant forward and "
                  "backward of large CPU tensors during train(): true on, false off, unset = the SQAKD_CPU_FUSED "
                  "environment variable (off unless it is 1). The first use of each kernel compiles for 5-25 s and "
                  "needs a C++ compiler (without one: eager path, one warning). GPU training is unaffected."},
    )

    def __post_init__(self) -> None:
        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number; got {value!r}")
            return float(value)

        for f in fields(self):  # every float argument, TrainingArguments' too: NaN/inf is never meant
            value = getattr(self, f.name, None)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(
                    f"{f.name} must be a finite number; got {value!r} (NaN/inf would make the loss and the weights NaN)"
                )
        if not number("temperature") > 0:
            raise ValueError(f"temperature must be > 0 (the KD softmax temperature T); got {self.temperature!r}")
        for name in ("kd_weight", "ce_weight", "quantizer_weight_decay"):
            if number(name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)!r}")
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError("kd_weight and ce_weight are both 0: there is nothing to train on")
        if self.quantizer_learning_rate is not None and number("quantizer_learning_rate") < 0:
            raise ValueError(f"quantizer_learning_rate must be >= 0 or None; got {self.quantizer_learning_rate!r}")
        if self.quantizer_lr_mode not in QUANTIZER_LR_MODES:
            raise ValueError(
                f"quantizer_lr_mode must be one of {', '.join(QUANTIZER_LR_MODES)}; got {self.quantizer_lr_mode!r} "
                "('relative': quantizer parameters move by about lr x their size per step; 'absolute': by about lr; "
                "'auto': relative from 8 bits up)"
            )
        if self.distill_target not in DISTILL_TARGETS:
            raise ValueError(f"distill_target must be one of {', '.join(DISTILL_TARGETS)}; got {self.distill_target!r}")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"hidden_loss must be one of {', '.join(HIDDEN_LOSSES)}; got {self.hidden_loss!r}")
        for name in ("calibration_batches", "ewgs_delta_update_steps", "ewgs_hessian_samples", "teacher_cache_top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE_POLICIES)}; got {self.nonfinite!r}")
        if not 0 <= number("nonfinite_max_skip_fraction") <= 1:
            raise ValueError(
                f"nonfinite_max_skip_fraction must be in [0, 1]; got {self.nonfinite_max_skip_fraction!r}"
            )
        check_bn_args(self.bn_policy, self.bn_freeze_steps)
        if self.ewgs_delta_schedule is not None and self.ewgs_delta_schedule not in EWGS_DELTA_SCHEDULES:
            raise ValueError(
                f"ewgs_delta_schedule must be None or one of {', '.join(EWGS_DELTA_SCHEDULES)}; "
                f"got {self.ewgs_delta_schedule!r}"
            )
        super().__post_init__()

    @property
    def effective_quantizer_learning_rate(self) -> float:
        """The learning rate of the quantizer parameter group."""
        if self.quantizer_learning_rate is not None:
            return float(self.quantizer_learning_rate)
        return float(self.learning_rate)
