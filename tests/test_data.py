"""sqakd_hf.data: the digits splits, loading local imagefolder / csv / parquet / save_to_disk data (also
streamed), column and modality checks, label mapping, and preprocessing with timm, an image processor
and a tokenizer. Real data (scikit-learn's digits, PNG files), real timm / transformers objects."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch

from cli_fixtures import save_timm_teacher, text_rows, tiny_bert_tokenizer, write_digits_imagefolder, write_text_csv
from sqakd_hf.app.data import (
    DIGITS,
    UNLABELED,
    Columns,
    DataError,
    image_collator,
    label_id_map,
    load_digits_splits,
    load_split,
    prepare_image_dataset,
    prepare_text_dataset,
    processor_image_transform,
    resolve_columns,
    text_collator,
    timm_image_transform,
)
from sqakd_hf.app.arguments import DataArguments


@pytest.fixture(scope="module")
def imgs(tmp_path_factory) -> Path:
    return write_digits_imagefolder(tmp_path_factory.mktemp("data") / "digits", n_train=30, n_test=10)


@pytest.fixture(scope="module")
def timm_teacher(tmp_path_factory):
    import timm

    path = save_timm_teacher(tmp_path_factory.mktemp("teacher") / "t")
    return timm.create_model(f"local-dir:{path}", pretrained=True).eval()


# ---- digits ---------------------------------------------------------------------------------------------
def test_digits_splits_are_real_deterministic_and_stratified():
    a = load_digits_splits(image_size=32)
    b = load_digits_splits(image_size=32)
    assert (len(a["train"]), len(a["test"])) == (1437, 360)  # 1797 real digits, 20% held out
    x = a["train"][:]["pixel_values"]
    assert x.shape == (1437, 3, 32, 32) and x.dtype == torch.float32
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(x, b["train"][:]["pixel_values"])
    assert torch.equal(a["test"][:]["labels"], b["test"][:]["labels"])
    counts = torch.bincount(a["test"][:]["labels"], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified
    other = load_digits_splits(image_size=16, seed=1, with_labels=False)
    assert other["train"].column_names == ["pixel_values"]
    assert other["test"][0]["pixel_values"].shape == (3, 16, 16)


def test_digits_by_name_including_streaming():
    args = DataArguments(dataset_name=DIGITS, image_size=16)
    ds = load_split(args, "test")
    assert len(ds) == 360 and ds[0]["pixel_values"].shape == (3, 16, 16)
    stream = load_split(DataArguments(dataset_name=DIGITS, streaming=True), "train")
    assert isinstance(stream, datasets.IterableDataset)
    assert next(iter(stream))["pixel_values"].shape == (3, 32, 32)
    with pytest.raises(DataError, match="has the splits train, test"):
        load_split(args, "validation")


# ---- images ---------------------------------------------------------------------------------------------
def test_imagefolder_with_timm_transform_and_labels(imgs, timm_teacher):
    args = DataArguments(dataset_name=str(imgs))
    ds = load_split(args, "train")
    cols = resolve_columns(ds, args, "image")
    assert (cols.input, cols.label) == ("image", "label")
    mapping = label_id_map(ds, "label", {i: str(i) for i in range(10)})
    assert mapping is None  # folder names 0..9 are the teacher's classes in the same order
    out = prepare_image_dataset(ds, timm_image_transform(timm_teacher), cols, 32, mapping)
    item = out[0]
    assert item["pixel_values"].shape == (3, 32, 32)
    batch = image_collator([out[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["labels"].dtype == torch.long
    names = ds.features["label"].names
    assert [int(names[i]) for i in ds[:4]["label"]] == batch["labels"].tolist()


def test_image_size_override_and_streaming_imagefolder(imgs, timm_teacher):
    args = DataArguments(dataset_name=str(imgs), streaming=True, image_size=24)
    stream = load_split(args, "test")
    assert isinstance(stream, datasets.IterableDataset)
    cols = resolve_columns(stream, args, "image")
    prepared = prepare_image_dataset(stream, timm_image_transform(timm_teacher, 24), cols, 24)
    first = next(iter(prepared))
    assert torch.as_tensor(first["pixel_values"]).shape == (3, 24, 24)
    assert set(first) == {"pixel_values", "labels"}


def test_unlabeled_images_and_use_labels_false(imgs, timm_teacher):
    args = DataArguments(dataset_name=str(imgs), use_labels=False)
    ds = load_split(args, "test")
    cols = resolve_columns(ds, args, "image")
    assert cols.label is None
    out = prepare_image_dataset(ds, timm_image_transform(timm_teacher), cols)
    assert set(out[0]) == {"pixel_values"}
    assert "labels" not in image_collator([out[0], out[1]])


def test_transformers_image_processor(imgs):
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": 30, "width": 30})
    ds = load_split(DataArguments(dataset_name=str(imgs)), "test")
    cols = resolve_columns(ds, DataArguments(), "image")
    out = prepare_image_dataset(ds, processor_image_transform(processor), cols)
    assert out[0]["pixel_values"].shape == (3, 30, 30)
    resized = prepare_image_dataset(ds, processor_image_transform(processor, 20), cols)
    assert resized[0]["pixel_values"].shape == (3, 20, 20)


# ---- text -----------------------------------------------------------------------------------------------
def test_csv_text_with_tokenizer_and_padding(tmp_path):
    write_text_csv(tmp_path / "train.csv", 12)
    args = DataArguments(dataset_name=str(tmp_path / "train.csv"), max_length=5)
    ds = load_split(args, "train")
    cols = resolve_columns(ds, args, "text")
    assert (cols.input, cols.label) == ("text", "label")
    tok = tiny_bert_tokenizer()
    out = prepare_text_dataset(ds, tok, cols, max_length=5)
    assert max(len(x) for x in out["input_ids"]) == 5  # truncated
    batch = text_collator(tok)([out[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 3 and batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["labels"].tolist() == [r["label"] for r in text_rows(3)]


def test_parquet_unlabeled_text_and_string_labels(tmp_path):
    rows = text_rows(8)
    datasets.Dataset.from_list([{"sentence": r["text"]} for r in rows]).to_parquet(str(tmp_path / "u.parquet"))
    args = DataArguments(dataset_name=str(tmp_path / "u.parquet"))
    ds = load_split(args, "train")
    cols = resolve_columns(ds, args, "text")
    assert (cols.input, cols.label) == ("sentence", None)
    out = prepare_text_dataset(ds, tiny_bert_tokenizer(), cols)
    assert set(out.column_names) == {"input_ids", "token_type_ids", "attention_mask"}

    named = datasets.Dataset.from_list([{"text": r["text"], "label": "positive" if r["label"] else "negative"}
                                        for r in rows])
    mapping = label_id_map(named, "label", {0: "negative", 1: "positive"})
    assert mapping == {"negative": 0, "positive": 1}
    out = prepare_text_dataset(named, tiny_bert_tokenizer(), Columns("text", "text", None, "label"), 16, mapping)
    assert out["labels"] == [r["label"] for r in rows]
    with pytest.raises(DataError, match="holds strings but the teacher has no class names"):
        label_id_map(named, "label", {0: "LABEL_0", 1: "LABEL_1"})


def test_empty_texts_are_dropped_and_streaming_text(tmp_path):
    ds = datasets.Dataset.from_list([{"text": "good movie"}, {"text": ""}, {"text": "bad plot"}])

    class NoSpecials:
        """A tokenizer that adds no special tokens (like GPT-2's): empty text -> no tokens."""

        def __init__(self):
            self.tok = tiny_bert_tokenizer()

        def __call__(self, texts, pairs=None, **kw):
            return self.tok(texts, pairs, add_special_tokens=False, **kw)

    out = prepare_text_dataset(ds, NoSpecials(), Columns("text", "text"))
    assert len(out) == 2
    write_text_csv(tmp_path / "s.csv", 6)
    stream = load_split(DataArguments(dataset_name=str(tmp_path / "s.csv"), streaming=True), "train")
    prepared = prepare_text_dataset(stream, tiny_bert_tokenizer(), Columns("text", "text", None, "label"))
    first = next(iter(prepared))
    assert "input_ids" in first and first["labels"] == 0


def test_save_to_disk_folder(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(text_rows(4)),
                               "validation": datasets.Dataset.from_list(text_rows(2, seed=3))})
    dd.save_to_disk(str(tmp_path / "saved"))
    args = DataArguments(dataset_name=str(tmp_path / "saved"))
    assert len(load_split(args, "validation")) == 2
    with pytest.raises(DataError, match="available splits: train, validation"):
        load_split(args, "test")


# ---- errors ---------------------------------------------------------------------------------------------
def test_missing_paths_columns_and_modalities(imgs, tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_split(DataArguments(dataset_name=str(tmp_path / "nope")), "train")
    with pytest.raises(DataError, match="data_dir .*no such file or directory"):
        load_split(DataArguments(dataset_name="imagefolder", data_dir=str(tmp_path / "nope")), "train")
    ds = load_split(DataArguments(dataset_name=str(imgs)), "test")
    with pytest.raises(DataError, match=r"image_column 'photo' does not exist .*available columns: image \(image\), "
                                        r"label \(label\)"):
        resolve_columns(ds, DataArguments(image_column="photo"), "image")
    with pytest.raises(DataError, match="has no text column: it looks like an image dataset"):
        resolve_columns(ds, DataArguments(), "text")
    with pytest.raises(DataError, match="label_column 'y' does not exist"):
        resolve_columns(ds, DataArguments(label_column="y"), "image")
    text = datasets.Dataset.from_list(text_rows(3))
    with pytest.raises(DataError, match=r"has no image column: it looks like a text dataset \(text columns: text\)"):
        resolve_columns(text, DataArguments(), "image")
    with pytest.raises(DataError, match="image_column 'text' holds text values, not images"):
        resolve_columns(text, DataArguments(image_column="text"), "image")


def test_label_names_are_matched_to_the_teacher(imgs):
    ds = load_split(DataArguments(dataset_name=str(imgs)), "test")
    reversed_names = {i: str(9 - i) for i in range(10)}
    mapping = label_id_map(ds, "label", reversed_names)
    assert mapping == {i: 9 - int(n) for i, n in enumerate(ds.features["label"].names)}
    assert label_id_map(ds, "label", {i: f"class{i}" for i in range(10)}) is UNLABELED  # unrelated folders
    assert label_id_map(ds, "label", {0: "LABEL_0", 1: "LABEL_1"}) is UNLABELED  # 10 classes vs 2: not its labels
    assert label_id_map(ds, "label", {i: f"LABEL_{i}" for i in range(10)}) is None  # same count, no names: as is
    with pytest.raises(DataError, match="has classes .* that the teacher does not know"):
        label_id_map(ds, "label", {0: "0", 1: "1", 2: "cat"})


# ---- separate training and evaluation sources, reader options, one-line loading errors -------------------
def _sources(tmp_path):
    from cli_fixtures import write_tweets_csv

    train = write_tweets_csv(tmp_path / "train.csv", 12, with_labels=False)
    evals = write_tweets_csv(tmp_path / "eval.csv", 6, seed=1)
    return train, evals


def _text_info():
    from sqakd_hf.app.models import TeacherInfo

    return TeacherInfo("t", "transformers", "text-classification", "text",
                       id2label={0: "negative", 1: "neutral", 2: "positive"})


def test_train_and_eval_files_with_their_own_columns_and_encoding(tmp_path):
    from sqakd_hf.app.splits import load_and_check_data

    train, evals = _sources(tmp_path)
    assert b"\xe9" in train.read_bytes()  # latin-1 bytes that are not utf-8
    data = DataArguments(train_files=[str(train)], eval_files=[str(evals)], text_column="tweet",
                         dataset_kwargs={"encoding": "latin-1"})
    raw = load_and_check_data(data, _text_info())
    assert raw.train.column_names == ["tweet"] and raw.eval.column_names == ["tweet", "label"]
    assert (raw.train_columns.input, raw.train_columns.label) == ("tweet", None)  # train has no labels: fine
    assert (raw.eval_columns.input, raw.eval_columns.label) == ("tweet", "label")
    from cli_fixtures import tweet_rows

    assert raw.train[0]["tweet"] == tweet_rows(12)[0]["tweet"]  # decoded as latin-1, accents intact
    assert raw.eval_source.split_name == "eval.csv" and raw.eval_source.describe()["files"] == [str(evals)]
    # the eval data may name its columns differently
    evals.write_text(evals.read_text(encoding="latin-1").replace("tweet,label", "text,sentiment"), encoding="latin-1")
    data = DataArguments(train_files=[str(train)], eval_files=[str(evals)], text_column="tweet",
                         eval_text_column="text", eval_label_column="sentiment", dataset_kwargs={"encoding": "latin-1"})
    raw = load_and_check_data(data, _text_info())
    assert (raw.eval_columns.input, raw.eval_columns.label) == ("text", "sentiment")


def test_a_split_mapping_reads_only_the_split_it_needs(tmp_path):
    """data_files {train: a.csv, validation: b.csv} with different columns: each split is loaded on its own."""
    from sqakd_hf.app.splits import load_and_check_data

    a = write_text_csv(tmp_path / "a.csv", 8, with_labels=False)
    b = write_text_csv(tmp_path / "b.csv", 4, seed=1)
    data = DataArguments(dataset_name="csv", data_files={"train": str(a), "validation": str(b)},
                         eval_split="validation")
    info = _text_info()
    info.id2label = None
    raw = load_and_check_data(data, info)
    assert raw.train.column_names == ["text"] and raw.eval.column_names == ["text", "label"]
    with pytest.raises(DataError, match="data_files has no 'test' entry .*it has train, validation"):
        load_split(data, "test")


LOADING_ERRORS = {
    "latin-1 read as utf-8": (lambda p: DataArguments(train_files=[str(p["latin"])]),
                              ["latin.csv is not utf-8 text (byte 0x",
                               "set dataset_kwargs: {encoding: latin-1}"]),
    "latin-1 eval file": (lambda p: DataArguments(train_files=[str(p["utf8"])], eval_files=[str(p["latin"])]),
                          ["latin.csv is not utf-8 text", "set eval_dataset_kwargs: {encoding: latin-1}"]),
    "latin-1 streamed": (lambda p: DataArguments(train_files=[str(p["latin"])], streaming=True),
                         ["latin.csv is not utf-8 text", "dataset_kwargs: {encoding: latin-1}"]),
    "columns differ between files": (lambda p: DataArguments(train_files=[str(p["utf8"]), str(p["labeled"])]),
                                     ["labeled.csv: its columns differ from the other files of train_files",
                                      "1 new columns ({'label'})", "eval_files"]),
    "missing file": (lambda p: DataArguments(train_files=[str(p["dir"] / "nope.csv")]),
                     ["train_files entry", "nope.csv", "no such file or directory"]),
    "pattern matching nothing": (lambda p: DataArguments(eval_files=[str(p["dir"] / "*.parquet")],
                                                         train_files=[str(p["utf8"])]),
                                 ["eval_files pattern", "matches no file"]),
    "unknown reader option": (lambda p: DataArguments(train_files=[str(p["utf8"])], dataset_kwargs={"encodng": "x"}),
                              ["dataset_kwargs: the csv reader of train_files", "has no option 'encodng'"]),
    "reserved reader option": (lambda p: DataArguments(train_files=[str(p["utf8"])], dataset_kwargs={"split": "x"}),
                               ["dataset_kwargs may not set 'split'"]),
    "unknown encoding": (lambda p: DataArguments(train_files=[str(p["latin"])], dataset_kwargs={"encoding": "latin-9x"}),
                         ["dataset_kwargs: unknown encoding 'latin-9x'"]),
    "broken json": (lambda p: DataArguments(train_files=[str(p["json"])]),
                    ["cannot read", "bad.json as json", "check the file's format"]),
    "mixed file types": (lambda p: DataArguments(train_files=[str(p["utf8"]), str(p["json"])]),
                         ["train_files mixes file types (csv, json)"]),
}


@pytest.mark.parametrize("case", sorted(LOADING_ERRORS))
def test_loading_errors_name_the_file_and_the_fix(case, tmp_path):
    from cli_fixtures import write_tweets_csv
    from sqakd_hf.app.sources import eval_source, load_source, train_source

    paths = {"dir": tmp_path, "latin": write_tweets_csv(tmp_path / "latin.csv", 6, with_labels=False),
             "utf8": write_tweets_csv(tmp_path / "utf8.csv", 6, with_labels=False, encoding="utf-8"),
             "labeled": write_tweets_csv(tmp_path / "labeled.csv", 6, encoding="utf-8"),
             "json": tmp_path / "bad.json"}
    paths["json"].write_text('{"text": "a"}\n{"text": \n')
    make, expected = LOADING_ERRORS[case]
    data = make(paths)
    with pytest.raises(DataError) as err:
        for source in (train_source(data), eval_source(data)):
            if source is not None:
                ds = load_source(source)
                next(iter(ds))
    message = str(err.value)
    assert "\n" not in message
    for text in expected:
        assert text in message, message


def test_recorded_data_arguments_are_absolute(tmp_path, monkeypatch):
    from sqakd_hf.app.sources import resolved_data_arguments

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    values = resolved_data_arguments(DataArguments(train_files=["a.csv"], eval_files=["e/*.csv"], data_dir=None))
    assert values["train_files"] == [str(tmp_path / "a.csv")] and values["eval_files"] == [str(tmp_path / "e/*.csv")]
    values = resolved_data_arguments(DataArguments(dataset_name="./d", eval_dataset_name="org/data",
                                                   eval_split="validation", data_files={"train": "x.csv"}))
    assert values["dataset_name"] == str(tmp_path / "d") and values["eval_dataset_name"] == "org/data"
    assert values["data_files"] == {"train": str(tmp_path / "x.csv")}
    assert resolved_data_arguments(DataArguments(dataset_name=DIGITS))["dataset_name"] == DIGITS


def test_the_encoding_error_points_at_the_first_bad_byte(tmp_path):
    from cli_fixtures import write_tweets_csv
    from sqakd_hf.app.sources import load_source, train_source

    path = write_tweets_csv(tmp_path / "t.csv", 4, with_labels=False)
    raw = path.read_bytes()
    offset = next(i for i, b in enumerate(raw) if b >= 0x80)
    with pytest.raises(DataError, match=rf"t.csv is not utf-8 text \(byte 0x{raw[offset]:02x} at offset {offset}\)"):
        load_source(train_source(DataArguments(train_files=[str(path)])))
    with pytest.raises(DataError, match=rf"is not ascii text \(byte 0x{raw[offset]:02x} at offset {offset}\)"):
        load_source(train_source(DataArguments(train_files=[str(path)], dataset_kwargs={"encoding": "ascii"})))
