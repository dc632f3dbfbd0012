"""Every shipped recipe parses into valid argument groups and a valid QuantConfig; recipes that need
the Hub fail offline with a clear error at the download (HF_HUB_OFFLINE=1, nothing is fetched);
recipes/quickstart.yaml runs end to end; the accelerate configs are valid accelerate configs. Also
the YAML + command-line override parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cli_fixtures import save_timm_teacher, write_digits_imagefolder, write_recipe
from sqakd_hf import QuantConfig, SQAKDTrainingArguments
from sqakd_hf.app.cli import METRICS_FILE, main
from sqakd_hf.app.data import DataError, load_split, resolve_columns
from sqakd_hf.app.models import inspect_teacher
from sqakd_hf.app.recipe import InputError, RecipeError, parse_overrides, parse_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ALL = sorted(p.name for p in RECIPES.glob("*.yaml"))
OFFLINE = {"quickstart.yaml", "own_text_data.yaml"}
HUB = sorted(set(ALL) - OFFLINE)
EXPECTED = {"quickstart.yaml", "timm_image_classification.yaml", "transformers_text_classification.yaml",
            "hf_vit_image_classification.yaml", "causal_lm.yaml", "cifar10_paper.yaml", "own_text_data.yaml"}


def test_the_shipped_recipes():
    assert set(ALL) == EXPECTED


@pytest.mark.parametrize("name", ALL)
def test_recipe_parses_and_builds_its_configs(name):
    recipe = parse_recipe(RECIPES / name)
    assert isinstance(recipe.training, SQAKDTrainingArguments)
    config = recipe.quant.to_quant_config()
    assert isinstance(config, QuantConfig) and config.method in ("lsq", "pact", "dorefa", "ewgs")
    assert recipe.model.teacher and (recipe.data.dataset_name or recipe.data.train_files) and "output_dir" in recipe.values
    assert recipe.training.ce_weight == 0  # label-free
    assert recipe.training.temperature > 0
    text = (RECIPES / name).read_text()
    assert ("NEEDS HUB ACCESS" in text) == (name not in OFFLINE), "recipes needing the Hub say so in a comment"


def test_paper_recipe_is_the_paper_setting():
    r = parse_recipe(RECIPES / "cifar10_paper.yaml")
    assert (r.quant.weight_bits, r.quant.act_bits, r.training.temperature) == (2, 2, 4.0)
    assert r.training.learning_rate == 1e-3 and r.training.effective_quantizer_learning_rate == 1e-5
    assert r.training.weight_decay == 1e-4 and r.training.quantizer_weight_decay == 0
    assert r.training.per_device_train_batch_size == 256
    assert str(r.training.lr_scheduler_type.value) == "cosine" and "adam" in str(r.training.optim.value)
    w4 = parse_recipe(RECIPES / "cifar10_paper.yaml", ["--weight_bits", "4", "--act_bits", "4"])
    assert w4.quant.to_quant_config().short_name == "lsq-W4A4"


@pytest.mark.parametrize("name", HUB)
def test_hub_recipes_stop_cleanly_at_the_download(name, tmp_path, capsys):
    """Offline, these recipes get as far as fetching the teacher / dataset and stop with a clear error."""
    recipe = parse_recipe(RECIPES / name)
    with pytest.raises(InputError) as err:
        inspect_teacher(recipe.model)
    local_teacher = not recipe.model.teacher.startswith(("hf-hub:",)) and recipe.model.teacher.startswith(".")
    assert ("no such folder" if local_teacher else "HF_HUB_OFFLINE is set") in str(err.value)
    if not recipe.data.dataset_name.startswith("."):
        with pytest.raises(DataError, match="HF_HUB_OFFLINE is set"):
            load_split(recipe.data, recipe.data.train_split)
    assert main(["train", str(RECIPES / name), "--output_dir", str(tmp_path / "out")]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_timm_recipe_data_side_on_a_local_imagefolder(tmp_path):
    imgs = write_digits_imagefolder(tmp_path / "imgs", n_train=10, n_test=10)
    (imgs / "test").rename(imgs / "validation")
    recipe = parse_recipe(RECIPES / "timm_image_classification.yaml", ["--dataset_name", str(imgs)])
    for split in (recipe.data.train_split, recipe.data.eval_split):
        cols = resolve_columns(load_split(recipe.data, split), recipe.data, "image")
        assert cols.input == "image"


def test_quickstart_recipe_runs_end_to_end(tmp_path):
    teacher = save_timm_teacher(tmp_path / "teacher")
    out = tmp_path / "run"
    assert main(["train", str(RECIPES / "quickstart.yaml"), "--teacher", str(teacher), "--output_dir", str(out),
                 "--max_steps", "2", "--per_device_train_batch_size", "32", "--save_strategy", "no",
                 "--calibration_batches", "1", "--disable_tqdm", "true"]) == 0
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert {"accuracy", "teacher_agreement", "kd_loss"} <= set(metrics["student"])
    assert (out / "packed" / "README.md").is_file()


def test_accelerate_configs():
    from accelerate.commands.config.config_args import ClusterConfig

    configs = {p.name: p for p in (RECIPES / "accelerate").glob("*.yaml")}
    assert set(configs) == {"cpu_ddp.yaml", "multi_gpu_ddp.yaml", "fsdp.yaml"}
    for path in configs.values():
        cfg = ClusterConfig.from_yaml_file(str(path))
        assert cfg.num_processes >= 2 and cfg.num_machines == 1
    cpu = yaml.safe_load(configs["cpu_ddp.yaml"].read_text())
    assert cpu["distributed_type"] == "MULTI_GPU" and cpu["num_processes"] == 2  # runs DDP over gloo on CPU
    assert yaml.safe_load(configs["fsdp.yaml"].read_text())["distributed_type"] == "FSDP"


# ---- YAML + overrides --------------------------------------------------------------------------------------
def test_yaml_and_overrides(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", teacher="t", dataset_name="d", output_dir=str(tmp_path / "o"),
                        learning_rate="1e-3", weight_bits=4, modules_to_not_convert=["fc"], save_packed=True)
    r = parse_recipe(path, ["--weight_bits", "2", "--learning_rate=2e-4", "--do_eval", "--no_save_packed",
                            "--modules_to_not_convert", "conv1", "fc", "--layer_bits", '{"fc": 8}',
                            "--max_train_samples", "null", "--report-to", "none"])
    assert r.quant.weight_bits == 2 and r.quant.act_bits == 4
    assert r.training.learning_rate == 2e-4 and r.training.do_eval is True
    assert r.run.save_packed is False
    assert r.quant.modules_to_not_convert == ["conv1", "fc"]
    assert r.quant.to_quant_config().layer_bits == {"fc": {"weight_bits": 8, "act_bits": 8}}
    assert r.data.max_train_samples is None
    # YAML reads 1e-3 as a string and an unquoted `no` as false: both become what the field means
    assert parse_recipe(path).training.learning_rate == 1e-3
    (tmp_path / "no.yaml").write_text("teacher: t\nsave_strategy: no\nfp16: no\n")
    no = parse_recipe(tmp_path / "no.yaml")
    assert no.training.save_strategy.value == "no" and no.training.fp16 is False
    assert parse_recipe(path, {"weight_bits": 8}).quant.weight_bits == 8


def test_bias_correction_takes_a_bool_or_auto_from_yaml_and_the_command_line(tmp_path):
    def setting(path=None, argv=()):
        return parse_recipe(path, list(argv)).quant.to_quant_config().bias_correction

    assert setting() == "auto"
    for word, value in (("false", False), ("yes", True), ("auto", "auto")):
        assert setting(argv=["--bias_correction", word]) == value
    (tmp_path / "off.yaml").write_text("teacher: t\nbias_correction: off\n")  # YAML 1.1: off is false
    assert setting(tmp_path / "off.yaml") is False
    with pytest.raises(RecipeError, match="bias_correction must be true, false or auto; got 'convs'"):
        setting(argv=["--bias_correction", "convs"])


def test_unknown_and_invalid_keys_are_clear_errors(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", teacher="t", wieght_bits=2)
    with pytest.raises(RecipeError) as err:
        parse_recipe(path)
    msg = str(err.value)
    assert "unknown key 'wieght_bits' (did you mean 'weight_bits'?)" in msg and str(path) in msg
    for group in ("model (ModelArguments)", "data (DataArguments)", "quantization (QuantArguments)",
                  "run (RunArguments)", "training (SQAKDTrainingArguments)"):
        assert group in msg
    assert "output_dir" in msg and "temperature" in msg and "dataset_name" in msg
    with pytest.raises(RecipeError, match="library must be one of auto, transformers, timm"):
        parse_recipe(None, {"library": "keras"})
    with pytest.raises(RecipeError, match="temperature must be > 0"):
        parse_recipe(None, {"temperature": 0})
    with pytest.raises(RecipeError, match="--weight_bits takes one value"):
        parse_overrides(["--weight_bits", "2", "4"])
    with pytest.raises(RecipeError, match="--teacher needs a value"):
        parse_overrides(["--teacher"])
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        parse_recipe(tmp_path / "list.yaml")


def test_quant_arguments_are_quant_config_arguments():
    """QuantArguments is generated from QuantConfig: same names, same defaults, documented; plus the fields that
    choose layer_bits by measurement (not passed to QuantConfig)."""
    import dataclasses
    import inspect

    from sqakd_hf.app.arguments import LAYER_CHOICE_FIELDS, QuantArguments
    from sqakd_hf.config import STORAGE_FIELDS

    params = {n: p.default for n, p in inspect.signature(QuantConfig.__init__).parameters.items()
              if n not in ("self", "kwargs", *STORAGE_FIELDS)}
    params.update({"layer_bits_budget": None, "sensitive_layer_bits": 8})
    assert {name for name, _, _ in LAYER_CHOICE_FIELDS} == {"layer_bits_budget", "sensitive_layer_bits"}
    fields = {f.name: f for f in dataclasses.fields(QuantArguments)}
    assert {n: f.default for n, f in fields.items()} == params
    assert all(f.metadata["help"] for f in fields.values())
    assert QuantArguments().to_quant_config().to_dict() == QuantConfig().to_dict()


def test_own_text_data_recipe_runs_on_the_users_files(tmp_path, monkeypatch):
    """The own-data recipe, unchanged, from a folder holding a teacher and latin-1 csv files in its layout."""
    from cli_fixtures import save_bert_teacher, write_tweets_csv

    monkeypatch.chdir(tmp_path)
    save_bert_teacher(tmp_path / "my-tweet-classifier")
    write_tweets_csv(tmp_path / "data" / "train.csv", 24, with_labels=False)
    write_tweets_csv(tmp_path / "data" / "test.csv", 8, seed=1)
    assert main(["train", str(RECIPES / "own_text_data.yaml"), "--max_steps", "1", "--disable_tqdm", "true"]) == 0
    record = json.loads((tmp_path / "out" / "tweets-lsq-w8a8" / "sqakd_run.json").read_text())
    assert record["status"] == "complete" and record["result"]["eval"]["examples"] == 8
