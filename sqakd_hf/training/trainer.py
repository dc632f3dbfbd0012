"""`SQAKDTrainer`: label-free quantization-aware training by distillation from the FP teacher.

A `transformers.Trainer` whose loss is the teacher's softened KL, ``T^2 KL(softmax(z_t / T) ||
softmax(z_s / T))`` (Hinton et al., 2015; SQAKD, Zhao & Zhao, AISTATS 2024), with:

* a frozen teacher (eval mode, no grad, placed by accelerate; bf16/fp16 on GPU when asked);
* calibration of the quantizers on training data right before the training loop starts
  (after a checkpoint is loaded, before DDP wraps the model), skipped when every quantizer
  is already initialised (a quantized checkpoint, a resume);
* a teacher/student output check on the first batch, before any step (shapes, and NaN/inf);
* a finiteness policy (``nonfinite``, see :mod:`.finite`): NaN/inf in inputs, teacher/student outputs or
  the loss is recorded on the device every step and reported at every log, save and evaluation; the
  trainer refuses to save weights after one;
* a BatchNorm statistics policy (``bn_policy``, see :mod:`.batchnorm`): by default (``"auto"``) an 8-bit
  student's BN layers stay in eval mode, keeping the teacher's running statistics (weight and bias still
  train), and a lower-bit student's BN re-estimates them;
* a separate optimizer group for quantizer parameters (own lr, no weight decay by default), those of 8-bit
  quantizers updated relative to their size by default (``quantizer_lr_mode``, see :mod:`.quantizer_lr`);
* label-free evaluation (:mod:`.metrics`): ``eval_kd_loss`` and ``eval_teacher_agreement`` (plus
  ``eval_accuracy`` and ``eval_teacher_accuracy`` when labels exist; ``eval_hidden_mse`` for
  hidden-state targets);
* optionally EWGS's Hessian-based delta schedule (see :mod:`.ewgs_schedule`);
* optionally a teacher-output cache (``cache_teacher_outputs``, see :mod:`.teacher_cache`): the teacher runs
  once over a fixed training set before the first step, and every step reads its outputs from disk.

Loss reduction: the KD loss of a micro-batch is its mean over samples (or non-padding tokens);
``loss_is_scaled_for_ga = False`` lets the Trainer divide by the accumulation steps once. Under
DDP with ``average_tokens_across_devices`` the denominator is the micro-batch's global count
(all-reduced), so gradients and the logged loss equal those of one process on the global batch.

Only public Trainer hooks are overridden, but for one private hook that keeps a timm-native student's
image columns (transformers has no public one; see ``SQAKDTrainer``'s column handling).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from accelerate.optimizer import AcceleratedOptimizer
from torch import Tensor, nn
from transformers import Trainer
from transformers.trainer_utils import has_length

from ..calibration import calibrate
from ..checkpoint import load_teacher, model_library, save_quantized
from ..errors import InputError
from ..serialization.manifest import non_finite
from ..hub.card_info import write_model_card
from ..hub.push import push_to_hub as push_quantized_to_hub
from ..injection import is_quantized, quant_layers, quantizer_parameters, named_quantizers
from ..quantizers import bypassing, cpu_fused
from ..model_io import call_input, call_model, output_tensor, padding_mask, split_labels
from ..model_io import unwrap as _core
from ..process_group import all_reduce_, world_size
from .args import SQAKDTrainingArguments
from .ddp import unused_parameters
from .batchnorm import batchnorm_modules, resolve_policy, set_batchnorm_eval, stats_frozen
from .ewgs_schedule import all_reduce_deltas, apply_ewgs_deltas, estimate_ewgs_deltas, ewgs_quantizers
from .finite import FiniteGuard, NonFiniteError, all_finite
from .quantizer_lr import RELATIVE_FROM_BITS, RelativeQuantizerUpdate
from .losses import hidden_state_per_position, kd_kl_per_position, kd_kl_topk_per_position
from .teacher_cache import (
    INDEX_KEY, CacheSpec, CachedTeacherCollator, IndexedDataset, TeacherCache, check_deterministic,
    dataset_fingerprint, open_or_build, split_cached, teacher_fingerprint,
)
from .metrics import STAT_COLUMNS, batch_stats, shifts_labels, summarize, trainer_metrics

try:
    from transformers.trainer_optimizer import is_optimizer_factory
except ImportError:  # older transformers 5.x: no optimizer factories

    def is_optimizer_factory(optimizer_cls: Any) -> bool:
        return False


logger = logging.getLogger(__name__)


def _iterable_shard_types() -> Tuple[type, ...]:
    """The wrappers that give each rank its shard of an iterable dataset (accelerate's, transformers')."""
    from accelerate.data_loader import IterableDatasetShard as AccelerateShard
    from transformers.trainer_pt_utils import IterableDatasetShard as TransformersShard

    return (AccelerateShard, TransformersShard)


_SHARD_TYPES = _iterable_shard_types()


def _forget_other_accelerator(model: nn.Module) -> None:
    """Drop the mark an earlier trainer's accelerator left on a plain module (or that ``copy.deepcopy`` of such a
    teacher carried over to a student): accelerate returns a marked module unprepared, so this trainer's
    accelerator would not compile, wrap (DDP) or place it."""
    model.__dict__.pop("_is_accelerate_prepared", None)


@dataclass
class _Distill:
    """One distillation forward: per-position losses and what evaluation needs."""

    per_position: Tensor
    mask: Optional[Tensor]
    student: Tensor
    teacher: Tensor
    outputs: Any
    labels: Optional[Tensor]


def calibration_samples(dataset: Any, args: SQAKDTrainingArguments, limit: Optional[int] = None) -> List[Any]:
    """This rank's share of ``args.calibration_batches`` global batches of seeded-random samples of ``dataset``
    (the first samples of a stream), uncollated; at most its first ``limit``.

    A global batch is one optimizer step's data (per-device batch x accumulation x processes); every rank draws
    the same samples and takes every ``world_size``-th, so all-reduced statistics do not depend on the number of
    processes or on accumulation. Raises ``ValueError`` for an empty dataset.
    """
    per_device = max(1, args.train_batch_size)
    world, rank = max(1, args.world_size), args.process_index
    total = args.calibration_batches * per_device * args.gradient_accumulation_steps * world
    if isinstance(dataset, torch.utils.data.IterableDataset) or not has_length(dataset):
        samples = list(itertools.islice(iter(dataset), total))
        order = None
    else:
        gen = torch.Generator().manual_seed(args.seed)
        order = torch.randperm(len(dataset), generator=gen)[:total].tolist()
    count = len(samples) if order is None else len(order)
    if count == 0:
        raise ValueError("the calibration data is empty: SQAKD needs (unlabeled) training inputs")
    mine = (list(range(rank, count, world)) or [rank % count])[:limit]
    return [samples[i] for i in mine] if order is None else [dataset[order[i]] for i in mine]


class SQAKDTrainer(Trainer):
    """Trainer for SQAKD: the student (a model with fake-quant layers) learns from the teacher only.

    Args:
        model: the student, built with :func:`~sqakd_hf.quantize_model` or loaded with
            ``quantization_config=QuantConfig(...)``.
        args: :class:`~sqakd_hf.SQAKDTrainingArguments`.
        teacher_model: the FP teacher, an ``nn.Module`` or a local path / Hub id (loaded with
            the student's class, timm for timm-native students, else ``AutoModel``).
        *trainer_args, **kwargs: every other `transformers.Trainer` argument.
    """

    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: Optional[nn.Module] = None,
        args: Optional[SQAKDTrainingArguments] = None,
        *trainer_args: Any,
        teacher_model: Union[nn.Module, str, os.PathLike, None] = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = SQAKDTrainingArguments(output_dir="tmp_trainer")
        if not isinstance(args, SQAKDTrainingArguments):
            raise TypeError(
                f"SQAKDTrainer needs SQAKDTrainingArguments (temperature, kd/ce weights, quantizer lr, ...); "
                f"got {type(args).__name__}"
            )
        if teacher_model is None:
            raise ValueError("SQAKDTrainer needs teacher_model: the full-precision model the student distills from")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "SQAKDTrainer computes its own loss (KD, plus ce_weight * the model's label loss): compute_loss_func "
                "would be ignored; subclass SQAKDTrainer and override compute_loss instead"
            )
        if model is not None:
            self._check_student(model, args)
            _forget_other_accelerator(model)
        train_dataset = kwargs.get("train_dataset", trainer_args[1] if len(trainer_args) > 1 else None)
        self._check_train_dataset(train_dataset)
        teacher = load_teacher(teacher_model, model)
        #: what the model card names as base_model: the teacher's path / Hub id, or the teacher itself
        self.teacher_ref: Any = teacher_model if isinstance(teacher_model, (str, os.PathLike)) else teacher
        if teacher is model:
            raise ValueError("teacher_model is the student itself: pass a separate full-precision copy")
        if is_quantized(teacher):
            raise ValueError("teacher_model contains fake-quant layers: the teacher must be the full-precision model")
        self._prepare_pending = False  # set by train(): calibrate and check when the training loader is built
        self._eval_prepared_id: Optional[int] = None  # the student _prepare_student_for_evaluation prepared
        #: the device-side NaN/inf record of the training steps (policy ``args.nonfinite``)
        self.finite_guard = FiniteGuard(args.nonfinite, args.nonfinite_max_skip_fraction)
        super().__init__(model, args, *trainer_args, **kwargs)
        # our compute_loss never hands num_items_in_batch to the model: keep the Trainer from counting label
        # tokens for it and (in transformers < 5.2x) from skipping its division by the accumulation steps
        self.model_accepts_loss_kwargs = False
        if model is None:  # model_init
            self._check_student(self.model, args)
        self.teacher = self._prepare_teacher(teacher)
        self._eval_totals: Optional[Tensor] = None
        self._checked_model_id: Optional[int] = None
        self._last_delta_step = -1
        #: latest EWGS deltas set by the Hessian schedule, by quantizer name
        self.ewgs_deltas: Dict[str, float] = {}
        self._bn_cache: Tuple[Optional[nn.Module], str, List[Tuple[str, nn.Module]]] = (None, "train", [])
        #: the teacher-output cache of the current (or last) training run (``args.cache_teacher_outputs``)
        self.teacher_cache: Optional[TeacherCache] = None
        #: the step hooks of ``quantizer_lr_mode`` 'relative' / 'auto' on the trainer's own optimizer (None otherwise)
        self.quantizer_update: Optional[RelativeQuantizerUpdate] = None

    # ---- validation ------------------------------------------------------------------------
    @staticmethod
    def _check_student(model: nn.Module, args: SQAKDTrainingArguments) -> None:
        if not is_quantized(_core(model)):
            raise ValueError(
                "the student has no quantizers (no fake-quant layers): build it with "
                "sqakd_hf.quantize_model(model, QuantConfig(method='lsq', weight_bits=4, act_bits=4)) or load it with "
                "from_pretrained(..., quantization_config=QuantConfig(...))"
            )
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(
                "the student has no trainable parameters (requires_grad is False everywhere; was it copied from a "
                "frozen teacher?): call student.requires_grad_(True)"
            )
        frozen = [n for n, layer in quant_layers(_core(model)) if not layer.weight.requires_grad]
        if frozen:
            logger.warning(
                "%d quantized layers have frozen weights (requires_grad=False; copied from a frozen teacher?), e.g. "
                "%s: only their quantizer parameters will train; call student.requires_grad_(True) to train them",
                len(frozen), frozen[0],
            )
        if args.ewgs_delta_schedule == "hessian" and not ewgs_quantizers(_core(model)):
            raise ValueError("ewgs_delta_schedule='hessian' needs EWGS quantizers: use QuantConfig(method='ewgs', ...)")

    @staticmethod
    def _check_train_dataset(dataset: Any) -> None:
        if dataset is not None and has_length(dataset) and len(dataset) == 0:
            raise ValueError("train_dataset is empty: SQAKD needs (unlabeled) training inputs to distill on")

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        _forget_other_accelerator(teacher)
        teacher.requires_grad_(False)
        teacher.eval()
        if getattr(getattr(teacher, "config", None), "use_cache", None):
            teacher.config.use_cache = False  # no KV cache to build on every training forward
        if self.args.device.type == "cuda" and (self.args.bf16 or self.args.fp16):
            teacher.to(torch.bfloat16 if self.args.bf16 else torch.float16)
        if self.args.device.type == "cpu" and model_library(teacher) == "timm" and any(
                isinstance(m, nn.Conv2d) for m in teacher.modules()):
            # oneDNN convolutions in channels_last skip a layout reorder per call: the frozen teacher's forward runs
            # 15-35% faster on CPU (resnet18/50, EfficientNet-Lite0), same outputs up to float rounding (~1e-7).
            # timm models support channels_last throughout (other code may .view() a conv output, which fails)
            teacher.to(memory_format=torch.channels_last)
        # accelerate now lists the teacher among its prepared models, so Trainer.evaluation_loop no longer
        # prepares a student that training has not prepared yet: see _prepare_student_for_evaluation
        return self.accelerator.prepare_model(teacher, evaluation_mode=True).eval()

    def _set_signature_columns_if_needed(self) -> None:  # no public hook to keep extra columns
        """timm-native students take ``forward(x)``: keep ``pixel_values`` (and ``x``) when the Trainer removes
        unused columns. transformers has no public hook to name columns to keep (``remove_unused_columns`` is
        all-or-nothing), so this private one is overridden; tests/test_trainer_public_api.py pins it."""
        super()._set_signature_columns_if_needed()  # no public hook to keep extra columns
        columns = self._signature_columns  # no public hook to keep extra columns: the Trainer's private list
        keep = ("pixel_values", "x") if model_library(self.model) != "transformers" else ()
        columns += [k for k in (*keep, INDEX_KEY) if k not in columns]  # INDEX_KEY: the teacher-output cache

    # ---- the distillation forward ----------------------------------------------------------
    def _to_device(self, batch: Mapping) -> Dict[str, Any]:
        """``batch`` on ``args.device`` (float inputs in DeepSpeed's dtype when DeepSpeed runs), as the Trainer
        prepares its inputs."""
        dtype = self.accelerator.state.deepspeed_plugin.hf_ds_config.dtype() if self.is_deepspeed_enabled else None

        def move(x: Any) -> Any:
            if isinstance(x, Tensor):
                return x.to(self.args.device, dtype=dtype if dtype is not None and x.is_floating_point() else None)
            if isinstance(x, Mapping):
                return type(x)({k: move(v) for k, v in x.items()})
            if isinstance(x, (list, tuple)):
                return type(x)(move(v) for v in x)
            return x

        return move(batch)

    def _extra_kwargs(self) -> Dict[str, Any]:
        return {"output_hidden_states": True} if self.args.distill_target == "hidden_states" else {}

    @torch.no_grad()
    def teacher_outputs(self, model_inputs: Mapping) -> Any:
        """The teacher's outputs on a batch (eval mode, no grad)."""
        if self.teacher.training:
            self.teacher.eval()
        return call_model(self.teacher, model_inputs, **self._extra_kwargs())

    def _distill(
        self, model: nn.Module, inputs: Mapping, with_ce_labels: bool = False, guard: bool = False
    ) -> _Distill:
        """One distillation forward; ``guard``: record NaN/inf in :attr:`finite_guard` (sync-free). A batch of a
        cached run carries the teacher's outputs (:func:`~sqakd_hf.training.teacher_cache.split_cached`): then
        the teacher does not run."""
        model_inputs, labels = split_labels(inputs)
        model_inputs, cached = split_cached(model_inputs)
        if guard:
            model_inputs = self.finite_guard.inputs(model_inputs)
        target, T = self.args.distill_target, self.args.temperature
        if cached is None:
            t = output_tensor(self.teacher_outputs(model_inputs), target, "teacher")
        else:  # full rows, or the top-k log-probabilities (the rest of the top-k form is used below)
            t = cached.get("outputs", cached.get("topk_log_probs"))
        extra = self._extra_kwargs()
        if with_ce_labels and labels is not None and model_library(model) == "transformers":
            extra["labels"] = labels
        outputs = call_model(model, model_inputs, **extra)
        s = output_tensor(outputs, target, "student")
        topk = cached is not None and "topk_indices" in cached
        if (s.shape[:-1] != t.shape[:-1]) if topk else (s.shape != t.shape):
            raise ValueError(self._mismatch_message(s, t))
        if guard:
            t = self.finite_guard.outputs(s, t)
        if topk:
            per = kd_kl_topk_per_position(s, cached["topk_indices"], t, cached["rest_log_mass"], T) * (T**2)
        elif target == "logits":
            per = kd_kl_per_position(s, t, T) * (T**2)
        else:
            per = hidden_state_per_position(s, t, self.args.hidden_loss)
        return _Distill(per, padding_mask(model_inputs, per), s, t, outputs, labels)

    def _mismatch_message(self, s: Tensor, t: Tensor) -> str:
        what = "logits" if self.args.distill_target == "logits" else "hidden states"
        return (
            f"teacher and student outputs do not match: student {what} have shape {tuple(s.shape)}, teacher {what} "
            f"{tuple(t.shape)}. The student must be a quantized copy of the teacher's architecture with the same "
            "output space (same number of labels / vocabulary size / hidden size)."
        )

    def _shifts_labels(self) -> bool:
        """Causal LMs predict token i+1 at position i (for label accuracy / CE, not for the KD loss)."""
        return shifts_labels(self.model)

    def _cross_entropy(self, d: _Distill) -> Tensor:
        loss = d.outputs.get("loss") if isinstance(d.outputs, Mapping) else None
        if loss is not None:
            return loss
        logits, labels = d.student, d.labels
        if logits.dim() == 3 and self._shifts_labels():
            logits, labels = logits[:, :-1], labels[:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)

    # ---- training --------------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: Dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Union[Tensor, int]] = None,
    ) -> Union[Tensor, Tuple[Tensor, Any]]:
        """``kd_weight * KD + ce_weight * CE``; KD is the mean over the micro-batch's samples
        (non-padding tokens for sequence outputs). Labels reach the student only when ``ce_weight > 0``.
        Inputs, outputs and the loss are checked for NaN/inf on the device (see :mod:`.finite`)."""
        use_ce = self.args.ce_weight > 0
        if model.training:
            self.apply_bn_policy(model)
        d = self._distill(model, inputs, with_ce_labels=use_ce, guard=True)
        num = (d.per_position * d.mask).sum() if d.mask is not None else d.per_position.sum()
        den = d.mask.sum() if d.mask is not None else torch.tensor(float(d.per_position.numel()), device=num.device)
        world = world_size()
        if world > 1 and self.args.average_tokens_across_devices and model.training:
            den = all_reduce_(den.detach().clone())
            kd = num * world / den.clamp_min(1.0)  # DDP averages gradients over ranks
        else:
            kd = num / den.clamp_min(1.0)
        loss = self.args.kd_weight * kd
        if use_ce:
            if d.labels is None:
                raise ValueError("ce_weight > 0 but the batch has no labels: remove ce_weight or add a label column")
            loss = loss + self.args.ce_weight * self._cross_entropy(d)
        loss = self.finite_guard.loss(loss, step=self.state.global_step + 1)
        return (loss, d.outputs) if return_outputs else loss

    def training_step(
        self, model: nn.Module, inputs: Dict[str, Any], num_items_in_batch: Optional[Union[Tensor, int]] = None
    ) -> Tensor:
        if (
            self.args.ewgs_delta_schedule == "hessian"
            and self.state.global_step % self.args.ewgs_delta_update_steps == 0
            and self._last_delta_step != self.state.global_step
        ):
            self.update_ewgs_deltas(self._to_device(inputs))
        return super().training_step(model, inputs, num_items_in_batch)

    def apply_bn_policy(self, model: nn.Module) -> int:
        """Put the student's BatchNorm layers in eval mode when ``args.bn_policy`` freezes their running
        statistics at this step (called after the Trainer's ``model.train()``, before the forward). A mode flip
        per layer, no host sync; no-op without BatchNorm. Returns how many layers were switched."""
        cached, policy, modules = self._bn_cache
        if cached is not model:
            policy, modules = resolve_policy(self.args.bn_policy, _core(model)), batchnorm_modules(model)
            self._bn_cache = (model, policy, modules)
        if not modules or not stats_frozen(policy, self.state.global_step, self.args.bn_freeze_steps):
            return 0
        return set_batchnorm_eval(modules)

    def update_ewgs_deltas(self, inputs: Mapping) -> Dict[str, float]:
        """Set every EWGS quantizer's delta from the Hessian trace of the KD loss on ``inputs``
        (see :mod:`sqakd_hf.ewgs_schedule`); model buffers (BN statistics) and RNG are left as found."""
        core = _core(self.model)
        model_inputs, _ = split_labels(inputs)
        saved = {n: b.detach().clone() for n, b in core.named_buffers()}
        was_training = core.training
        core.train()
        self.apply_bn_policy(core)  # the loss the steps train on

        def loss_fn() -> Tensor:
            d = self._distill(core, model_inputs)
            if d.mask is None:
                return d.per_position.mean()
            return (d.per_position * d.mask).sum() / d.mask.sum().clamp_min(1.0)

        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and self.args.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                deltas = estimate_ewgs_deltas(
                    core, loss_fn, self.args.ewgs_hessian_samples, seed=self.args.seed + self.state.global_step
                )
        finally:
            with torch.no_grad():
                for n, b in core.named_buffers():
                    if n in saved:
                        b.copy_(saved[n])
            core.train(was_training)
        deltas = all_reduce_deltas(deltas, device=self.args.device)
        bad = sorted(n for n, v in deltas.items() if not math.isfinite(v))
        if bad:  # the estimate is a host float already: no extra sync
            if not self.finite_guard.skips:
                raise NonFiniteError(
                    f"SQAKD training stopped: the EWGS Hessian delta estimate at optimizer step "
                    f"{self.state.global_step + 1} is NaN/inf for {len(bad)} quantizer(s), e.g. {bad[0]}: the batch "
                    "or the model has NaN/inf values. Clean the data, or pass nonfinite='skip_batch' (keeps the "
                    "previous deltas)"
                )
            logger.warning("sqakd: EWGS delta estimate is NaN/inf at step %d for %s: previous deltas kept",
                           self.state.global_step + 1, bad)
            deltas = {n: v for n, v in deltas.items() if n not in bad}
        apply_ewgs_deltas(core, deltas)
        self.ewgs_deltas = deltas
        self._last_delta_step = self.state.global_step
        if deltas:
            values = list(deltas.values())
            logger.info(
                "sqakd: EWGS delta (Hessian) at step %d: mean %.3g, min %.3g, max %.3g",
                self.state.global_step, sum(values) / len(values), min(values), max(values),
            )
        return deltas

    # ---- optimizer -------------------------------------------------------------------------
    def quantizer_param_groups(self, model: nn.Module) -> List[Dict[str, Any]]:
        """Three groups: decayed weights, non-decayed weights (bias, norms), quantizer parameters
        (``quantizer_learning_rate``, ``quantizer_weight_decay``)."""
        qids = {id(p) for p in quantizer_parameters(_core(model))}
        decay = set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        quant = [p for _, p in named if id(p) in qids]
        fine = {id(p) for _, q in named_quantizers(_core(model)) if q.bits >= RELATIVE_FROM_BITS
                for p in q.quant_parameters()}
        mode = self.args.quantizer_lr_mode
        # the last group is the one updated relative to size (all quantizers, or with "auto" the >= 8-bit ones)
        parts = [quant] if mode != "auto" else [[p for p in quant if id(p) not in fine], [p for p in quant if id(p) in fine]]
        return [
            {"params": [p for n, p in named if id(p) not in qids and n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if id(p) not in qids and n not in decay], "weight_decay": 0.0},
        ] + [
            {"params": part, "weight_decay": self.args.quantizer_weight_decay,
             "lr": self.args.effective_quantizer_learning_rate}
            for part in parts
        ]

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        opt_model = self.model if model is None else model
        if self.optimizer is not None:
            return self.optimizer
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if is_optimizer_factory(optimizer_cls) or any(k in optimizer_kwargs for k in ("params", "model", "optimizer_dict")):
            logger.warning(
                "sqakd: optimizer %s builds its own parameter groups; quantizer parameters get no separate group%s",
                getattr(optimizer_cls, "__name__", optimizer_cls),
                " and absolute updates (quantizer_lr_mode 'relative' / 'auto' needs the trainer's groups)"
                if self.args.quantizer_lr_mode != "absolute" else "",
            )
            return super().create_optimizer(model)
        groups = self.quantizer_param_groups(opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        if self.args.quantizer_lr_mode != "absolute":  # the relative quantizer group is the last one
            self.quantizer_update = RelativeQuantizerUpdate(self.optimizer, len(groups) - 1)
        return self.optimizer

    # ---- calibration and checks before the first step ---------------------------------------
    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, *args: Any, **kwargs: Any):
        """``Trainer.train``, with the student calibrated and checked before the first step (see
        :meth:`get_train_dataloader`)."""
        self._check_train_dataset(self.train_dataset)
        restore = self._use_teacher_cache() if self.args.cache_teacher_outputs else None
        self._prepare_pending = True
        self.finite_guard.reset()
        fused = self.args.fused_quantizers
        try:
            with cpu_fused.use(fused) if fused is not None else contextlib.nullcontext():
                output = super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._prepare_pending = False
            if restore is not None:
                self.train_dataset, self.data_collator = restore
        self.check_finite(" at the end of training")
        return output

    @property
    def teacher_cache_dir(self) -> str:
        """Where the teacher-output cache lives: ``args.teacher_cache_dir``, default ``<output_dir>/_teacher_cache``
        (the Trainer's Hub uploads of ``output_dir`` skip names starting with ``_``)."""
        return self.args.teacher_cache_dir or os.path.join(self.args.output_dir, "_teacher_cache")

    def _use_teacher_cache(self) -> Tuple[Any, Any]:
        """Open (or build, running the teacher once over the training set) the teacher-output cache, then let the
        training loader read it: returns the ``(train_dataset, data_collator)`` to restore after training."""
        args, data = self.args, self.train_dataset
        if data is None or isinstance(data, torch.utils.data.IterableDataset) or not has_length(data):
            raise InputError(
                "cache_teacher_outputs needs a map-style train_dataset (with len() and indexing) whose samples are "
                f"the same every epoch; got {type(data).__name__}. Materialise it, or train without the cache"
            )
        dataset, collator = self._calibration_source(data)
        check_deterministic(dataset, collator)
        fingerprint = {"teacher": teacher_fingerprint(_core(self.teacher)),
                       "dataset": dataset_fingerprint(dataset, collator), "target": args.distill_target}
        spec = CacheSpec(args.distill_target, args.teacher_cache_top_k, float(args.temperature))
        self.teacher_cache, _ = open_or_build(
            self.teacher_cache_dir, fingerprint, spec, dataset, collator,
            lambda inputs: output_tensor(self.teacher_outputs(inputs), args.distill_target, "teacher"),
            rank=args.process_index, world=max(1, args.world_size), barrier=self.accelerator.wait_for_everyone,
            batch_size=args.eval_batch_size, device=args.device, num_workers=args.dataloader_num_workers,
        )
        restore = (self.train_dataset, self.data_collator)
        self.train_dataset = IndexedDataset(data)
        self.data_collator = CachedTeacherCollator(self.data_collator, self.teacher_cache)
        return restore

    # ---- the finiteness policy (read side; the record is written by compute_loss) ----------------
    def check_finite(self, where: str = "") -> int:
        """Read :attr:`finite_guard` (one host sync, all-reduced across processes); raise
        :class:`~sqakd_hf.training.finite.NonFiniteError` on NaN/inf the policy does not skip, or on too
        many skipped batches. Returns the number of skipped batches."""
        g = self.finite_guard
        steps = self.state.max_steps if self.state.max_steps and self.state.max_steps > 0 else None
        g.planned_batches = steps * self.args.gradient_accumulation_steps if steps else None
        g.processes = max(1, self.args.world_size)
        return g.check(where)

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        """``Trainer.log``, after the finiteness check of the steps since the last log (so a NaN run fails
        instead of logging a filtered loss); under ``nonfinite='skip_batch'`` training logs carry
        ``nonfinite_skipped_batches``."""
        skipped = self.check_finite(f" (checked at step {self.state.global_step})")
        g = self.finite_guard
        if g.skips and g.batches and ("loss" in logs or "train_loss" in logs):
            logs["nonfinite_skipped_batches"] = skipped
            if skipped > g.reported_skips:
                logger.warning(
                    "sqakd: skipped %d batch(es) with NaN/inf inputs or teacher outputs so far (%d new, of %d)",
                    skipped, skipped - g.reported_skips, g.batches,
                )
                g.reported_skips = skipped
        super().log(logs, start_time)

    def check_weights_finite(self) -> None:
        """Raise :class:`~sqakd_hf.training.finite.NonFiniteError` if a parameter or buffer of the student is
        NaN/inf (one host sync)."""
        core = _core(self.model)
        bad = non_finite(dict(itertools.chain(core.named_parameters(), core.named_buffers())))
        if bad:
            raise NonFiniteError(
                f"refusing to save: {len(bad)} tensor(s) of the student are NaN/inf, e.g. {bad[0]!r}. Training "
                "diverged or saw NaN/inf data; save from a checkpoint taken before it (see the training error, or "
                "train with nonfinite='error' to find the first bad step)"
            )

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """The Trainer's training loader; inside :meth:`train`, also :meth:`prepare_student` on its data.

        ``Trainer.train`` builds this loader first in its training loop: after it loaded a resumed
        checkpoint (so restored quantizers are not recalibrated) and before the model is wrapped for
        distributed training (DDP).
        """
        loader = super().get_train_dataloader()
        if self._prepare_pending:
            self._prepare_pending = False
            self._check_student(self.model, self.args)
            self.prepare_student(loader, force_check=True)
            self._choose_find_unused_parameters(loader)
            self._last_delta_step = -1
        return loader

    def _choose_find_unused_parameters(self, loader: Any) -> None:
        """Under DDP, unless ``ddp_find_unused_parameters`` is set: False when the objective reaches every trainable
        parameter of the student (DDP then neither searches the graph each step nor warns), True with a note
        otherwise (e.g. a pooler when hidden states are distilled). Runs before the model is wrapped."""
        handler = self.accelerator.ddp_handler  # the DistributedDataParallelKwargs the Trainer passed to accelerate
        if self.args.world_size <= 1 or self.args.ddp_find_unused_parameters is not None or handler is None:
            return
        batch = self._calibration_batches(loader, first_only=True)[0]
        unused = unused_parameters(_core(self.model), batch, self.args.distill_target)
        handler.find_unused_parameters = bool(unused)
        if unused and self.is_world_process_zero():
            logger.warning("sqakd: %d trainable parameter(s) get no gradient (e.g. %s): DDP runs with "
                           "find_unused_parameters=True", len(unused), unused[0])

    def prepare_student(self, dataset: Any = None, force_check: bool = False) -> None:
        """Calibrate the student's quantizers if any is uninitialised, then check teacher/student
        outputs on the first batch. Runs on every rank (statistics are all-reduced).

        ``dataset``: a dataset or a DataLoader built by this trainer (default: ``train_dataset``).
        """
        dataset = self.train_dataset if dataset is None else dataset
        needs_calibration = not all(q.initialized for _, q in named_quantizers(_core(self.model)))
        if not needs_calibration and not force_check and self._checked_model_id == id(self.model):
            return
        if dataset is None:
            if needs_calibration:
                raise ValueError("the student's quantizers are not calibrated and there is no dataset to calibrate on")
            return
        if not isinstance(dataset, torch.utils.data.DataLoader):
            self._check_train_dataset(dataset)
        batches = self._calibration_batches(dataset, first_only=not needs_calibration)
        if needs_calibration or force_check:  # calibration and the pre-training check need finite data
            batches = self._finite_calibration_batches(batches)
        core = _core(self.model)
        teacher = None
        if needs_calibration:
            with bypassing(q for _, q in named_quantizers(core)):  # a mismatch fails before calibration changes it
                teacher = self._check_outputs(batches[0])
            calibrate(core, [call_input(core, split_labels(b)[0]) for b in batches])
        self._check_outputs(batches[0], finite=force_check, teacher=teacher)
        self._checked_model_id = id(self.model)

    def _finite_calibration_batches(self, batches: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """``batches`` whose float inputs are all finite (one host sync for all): NaN/inf is an error naming the
        batch and column, or under ``nonfinite='skip_batch'`` the batch is left out (an error if none is left)."""
        found = []
        for b in batches:
            model_inputs, _ = split_labels(b)
            cols = [(k, v) for k, v in model_inputs.items() if isinstance(v, Tensor) and v.is_floating_point()]
            found.append((cols, all_finite([v for _, v in cols])))
        flags = [ok for _, ok in found if ok is not None]
        if not flags:
            return batches
        ok_all = torch.stack([f.to(self.args.device) for f in flags]).tolist()
        it = iter(ok_all)
        ok = [True if f is None else next(it) for _, f in found]
        if all(ok):
            return batches
        i = ok.index(False)
        cols = found[i][0]
        bad_cols = [k for k, v in cols if not bool(torch.isfinite(v).all())]
        if not self.finite_guard.skips:
            raise NonFiniteError(
                f"calibration batch {i} (of {len(batches)} drawn from the training data) has NaN/inf values in "
                f"{bad_cols}: the dataset has non-finite samples. Clean it (keep samples with torch.isfinite(x).all()) "
                "or pass nonfinite='skip_batch' to skip such batches"
            )
        kept = [b for b, good in zip(batches, ok) if good]
        logger.warning("sqakd: %d of %d calibration batches have NaN/inf inputs (%s) and are left out "
                       "(nonfinite='skip_batch')", len(batches) - len(kept), len(batches), bad_cols)
        if not kept:
            raise NonFiniteError(
                f"every calibration batch ({len(batches)}) has NaN/inf inputs ({bad_cols}): clean the training data"
            )
        return kept

    def _calibration_source(self, data: Any) -> Tuple[Any, Any]:
        """``(dataset, collator)`` as the Trainer's loaders see them (unused columns removed): taken from
        ``data`` when it is a loader, else from :meth:`get_test_dataloader` on ``data``."""
        loader = data if isinstance(data, torch.utils.data.DataLoader) else self.get_test_dataloader(data)
        dataset = loader.dataset
        while isinstance(dataset, _SHARD_TYPES):  # per-rank shard of an iterable dataset: take the whole stream
            dataset = dataset.dataset
        return dataset, loader.collate_fn

    def _calibration_batches(self, data: Any, first_only: bool = False) -> List[Dict[str, Any]]:
        """This rank's share of ``calibration_batches`` global batches (:func:`calibration_samples`), collated and
        on the device; ``first_only``: only its first batch."""
        dataset, collator = self._calibration_source(data)
        per_device = max(1, self.args.train_batch_size)
        pick = calibration_samples(dataset, self.args, limit=per_device if first_only else None)
        batches = [collator(pick[i : i + per_device]) for i in range(0, len(pick), per_device)]
        return [self._to_device(split_cached(b)[0]) for b in batches]

    @torch.no_grad()
    def _check_outputs(self, batch: Mapping, finite: bool = False, teacher: Optional[Tensor] = None) -> Tensor:
        """Teacher and student outputs on ``batch`` match in shape; ``finite`` (before training): and are finite.
        ``teacher``: the teacher's output on ``batch`` if already computed. Returns the teacher's output."""
        core = _core(self.model)
        was_training = core.training
        core.eval()
        try:
            model_inputs, _ = split_labels(batch)
            t = teacher if teacher is not None else output_tensor(
                self.teacher_outputs(model_inputs), self.args.distill_target, "teacher")
            s = output_tensor(call_model(core, model_inputs, **self._extra_kwargs()), self.args.distill_target, "student")
        finally:
            core.train(was_training)
        if s.shape != t.shape:
            raise ValueError(self._mismatch_message(s, t))
        if finite:
            self._check_first_outputs(s, t)
        return t

    def _check_first_outputs(self, s: Tensor, t: Tensor) -> None:
        """NaN/inf teacher or student outputs on the first (finite) batch: a broken model, reported before any step.
        Under ``skip_batch`` a teacher that fails on only some samples is left to the per-step policy.
        (Evaluation does not run this check: it reports NaN outputs as disagreement and a NaN ``eval_kd_loss``.)"""
        t_row = torch.isfinite(t.reshape(t.shape[0], -1)).all(1)
        flags = torch.stack([t_row.all(), t_row.any(), torch.isfinite(s).all()]).tolist()
        teacher_ok, teacher_some, student_ok = flags
        if not teacher_ok and not (self.finite_guard.skips and teacher_some):
            raise NonFiniteError(
                f"the teacher's outputs on the first training batch are NaN/inf ({int((~t_row).sum())} of "
                f"{t_row.numel()} samples) on finite inputs: the teacher is broken. Check its weights "
                "(torch.isfinite(p).all() for each parameter) and run it in float32 (float16 overflows)"
                + ("" if self.finite_guard.skips else ", or pass nonfinite='skip_batch' if only some samples fail")
            )
        if not teacher_ok:
            logger.warning("sqakd: the teacher's outputs are NaN/inf on %d of %d samples of the first batch: "
                           "such batches will be skipped (nonfinite='skip_batch')", int((~t_row).sum()), t_row.numel())
        if not student_ok:
            raise NonFiniteError(
                "the calibrated student's outputs on the first training batch are NaN/inf while the teacher's are "
                "finite: check the student's weights (copied from a NaN model?) and its QuantConfig"
            )

    # ---- label-free evaluation --------------------------------------------------------------
    def _prepare_student_for_evaluation(self) -> None:
        """What ``Trainer.evaluation_loop`` does to a model no one prepared yet (device, mixed-precision
        autocast, ``torch.compile``), for a student evaluated before any training.

        The Trainer does it only when accelerate lists no prepared model, and the teacher is listed.
        Training prepares the student together with its optimizer (then an ``AcceleratedOptimizer``).
        """
        prepared_by_training = isinstance(self.optimizer, AcceleratedOptimizer)
        if (
            prepared_by_training
            or self._eval_prepared_id == id(self.model)
            or self.is_in_train
            or self.model_wrapped is not self.model
            or self.args.n_gpu > 1
        ):
            return
        if self.is_deepspeed_enabled and self.deepspeed is None:
            from transformers.integrations.deepspeed import deepspeed_init

            deepspeed_init(self, num_training_steps=0, inference=True)
        start = time.time()
        if self.is_deepspeed_enabled or (self.is_fsdp_enabled and not self.args.torch_compile):
            prepared = self.accelerator.prepare(self.model)
        else:
            prepared = self.accelerator.prepare_model(self.model, evaluation_mode=True)
        self.model_preparation_time = round(time.time() - start, 4)
        if self.is_fsdp_enabled:
            self.model = prepared
        if prepared is not self.model:
            self.model_wrapped = prepared
        if self.is_deepspeed_enabled:
            self.deepspeed = self.model_wrapped
        self._eval_prepared_id = id(self.model)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        """The Trainer's loop plus the label-free metrics of :mod:`.metrics`: ``{prefix}_kd_loss`` (the training
        objective), ``{prefix}_teacher_agreement``, and with labels ``{prefix}_accuracy`` (unless
        ``compute_metrics`` already reports one) and ``{prefix}_teacher_accuracy``; hidden-state targets report
        ``{prefix}_hidden_mse`` instead of the agreement and accuracies."""
        self.check_finite(" before evaluation")
        self.prepare_student(self.train_dataset if self.train_dataset is not None else dataloader)
        self._prepare_student_for_evaluation()
        self._eval_totals = None
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        totals, self._eval_totals = self._eval_totals, None
        if totals is not None:
            logits = self.args.distill_target == "logits"
            values = dict(zip(STAT_COLUMNS, totals.tolist()))
            found = trainer_metrics(summarize(totals, logits=logits), metric_key_prefix)
            if not logits and values["positions"] > 0:  # the hidden-state objective (MSE or cosine)
                found[f"{metric_key_prefix}_kd_loss"] = values["kd"] / values["positions"]
            for key, value in found.items():
                output.metrics.setdefault(key, value)
        return output

    def prediction_step(
        self,
        model: nn.Module,
        inputs: Dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: Optional[List[str]] = None,
    ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """KD loss of the batch, the student's logits (or hidden states) and the labels (if any); no labels needed."""
        inputs = self._to_device(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            d = self._distill(model, inputs)
        self._accumulate_eval_stats(d)
        w = d.mask if d.mask is not None else torch.ones_like(d.per_position)
        loss = ((d.per_position * w).sum() / w.sum().clamp_min(1.0)).detach()
        if prediction_loss_only:
            return loss, None, None
        return loss, d.student.detach(), d.labels

    def _accumulate_eval_stats(self, d: _Distill) -> None:
        """Per-sample :func:`~sqakd_hf.training.metrics.batch_stats`, gathered across processes (duplicates of
        the last batch dropped) and summed on the device."""
        stats = batch_stats(
            d.student, d.teacher, logits=self.args.distill_target == "logits", labels=d.labels, weights=d.mask,
            temperature=self.args.temperature, shift_labels=self._shifts_labels(), objective=d.per_position,
        )
        stats = self.accelerator.gather_for_metrics(stats).double().sum(0)
        self._eval_totals = stats if self._eval_totals is None else self._eval_totals + stats

    # ---- saving and sharing ----------------------------------------------------------------
    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Training form. transformers models: the Trainer's path (config.json carries quantization_config);
        timm-native students: timm's layout plus quantization_config, so ``from_pretrained_timm`` reads it.
        Refuses (:class:`~sqakd_hf.training.finite.NonFiniteError`) after NaN/inf the policy did not skip, or
        when a weight is NaN/inf."""
        self.check_finite(" before saving")
        self.check_weights_finite()
        if model_library(self.model) != "timm":
            return super().save_model(output_dir, _internal_call)
        if self.args.should_save:  # one writer per checkpoint under DDP
            save_quantized(_core(self.model), output_dir or self.args.output_dir, processor=self.processing_class)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _card_metrics(self) -> Dict[str, Dict[str, float]]:
        """The student's latest evaluation metrics, as the model card reports them."""
        latest = next((h for h in reversed(self.state.log_history) if "eval_kd_loss" in h), None)
        if latest is None:
            return {}
        keys = ("eval_accuracy", "eval_teacher_agreement", "eval_kd_loss")
        return {"student": {k[len("eval_"):]: float(latest[k]) for k in keys if k in latest}}

    def _card_training(self) -> Dict[str, Any]:
        a = self.args
        return {
            "temperature": a.temperature, "kd_weight": a.kd_weight, "ce_weight": a.ce_weight,
            "learning_rate": a.learning_rate, "quantizer_learning_rate": a.effective_quantizer_learning_rate,
            "quantizer_lr_mode": a.quantizer_lr_mode,
            # epochs actually trained (a max_steps run may end long before num_train_epochs)
            "epochs": round(float(self.state.epoch or 0.0), 3), "global_steps": self.state.global_step,
        }

    def create_model_card(
        self,
        language: Optional[str] = None,
        license: Optional[str] = None,
        tags: Union[str, List[str], None] = None,
        model_name: Optional[str] = None,
        finetuned_from: Optional[str] = None,
        tasks: Union[str, List[str], None] = None,
        dataset_tags: Union[str, List[str], None] = None,
        dataset: Union[str, List[str], None] = None,
        dataset_args: Union[str, List[str], None] = None,
    ) -> None:
        """Render sqakd_hf's model card (teacher as base_model, bits, metrics) into ``output_dir/README.md``
        instead of the Trainer's generic card."""
        if not self.is_world_process_zero():
            return
        as_list = lambda v: [v] if isinstance(v, str) else list(v or [])  # noqa: E731
        write_model_card(
            _core(self.model), self.args.output_dir, teacher=finetuned_from or self.teacher_ref,
            metrics=self._card_metrics(), training=self._card_training(), repo_id=self.args.hub_model_id,
            license=license, tags=as_list(tags), datasets=as_list(dataset_tags or dataset),
        )

    def push_to_hub(
        self,
        commit_message: Optional[str] = "End of training",
        blocking: bool = True,
        token: Optional[str] = None,
        revision: Optional[str] = None,
        format: str = "packed",
        **kwargs: Any,
    ):
        """Save the training form to ``output_dir`` (with the model card), then upload the student in ``format``
        (``"packed"``: the packed low-bit form; ``"compressed-tensors"`` / ``"onnx"``: a deploy form that loads
        without ``sqakd_hf``, with the trainer's ``processing_class``; see :func:`sqakd_hf.push_to_hub`) and its card
        to ``args.hub_model_id`` (default: the output folder's name)."""
        self.save_model(_internal_call=True)  # not a user call: no second push from save_model
        if not self.is_world_process_zero():
            return None
        card_keys = ("license", "tags", "finetuned_from", "dataset_tags", "dataset")
        self.create_model_card(**{k: kwargs[k] for k in card_keys if k in kwargs})
        repo_id = self.args.hub_model_id or os.path.basename(os.path.normpath(self.args.output_dir))
        return push_quantized_to_hub(
            _core(self.model), repo_id, commit_message=commit_message, private=self.args.hub_private_repo,
            token=token or self.args.hub_token, revision=revision, teacher=self.teacher_ref,
            metrics=self._card_metrics(), training=self._card_training(), format=format,
            processor=self.processing_class,
        )
