"""Bad documents corpora and contradictory data settings: each a one-line error that names the file or the key and
says what to change, and nothing written is left looking complete."""
import json
from pathlib import Path

import pytest

import lm.data.documents
from conftest import sample_documents, write_documents
from lm.config import ConfigError, load_config
from lm.data import DataError, prepare_corpus


def doc_cfg(cache: Path, *overrides: str):
    return load_config([], [f"data.cache_dir={cache}", "data.num_proc=1", "data.progress=false",
                            "data.tokenizer.vocab_size=400", *overrides]).data


def prepare_error(tmp_path: Path, train_glob: str, *overrides: str) -> str:
    """The one-line message of preparing a corpus whose train files are ``train_glob``."""
    with pytest.raises(DataError) as info:
        prepare_corpus(doc_cfg(tmp_path / "cache", f"data.files.train={train_glob}", *overrides))
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def shards(tmp_path) -> Path:
    """Three good JSONL shards under ``tmp_path/src``."""
    docs = sample_documents(150, seed=20)
    for k in range(3):
        write_documents(tmp_path / "src" / f"s{k}.jsonl", docs[50 * k:50 * (k + 1)], id=list(range(50)))
    return tmp_path / "src"


def test_a_glob_matching_nothing(tmp_path):
    message = prepare_error(tmp_path, str(tmp_path / "nope" / "*.jsonl"))
    assert "data.files.train=" in message and "matches no file" in message


def test_a_missing_column(tmp_path, shards):
    message = prepare_error(tmp_path, f"{shards}/*.jsonl", "data.text_field=content")
    assert message.startswith(str(shards / "s0.jsonl")) and "no column 'content'" in message
    assert "['id', 'text']" in message and "set data.text_field" in message


def test_a_column_that_is_not_text(tmp_path, shards):
    message = prepare_error(tmp_path, f"{shards}/*.jsonl", "data.text_field=id")
    assert "s0.jsonl: column 'id' holds int64, not text" in message


@pytest.mark.parametrize("bad", ["zero bytes", "no rows", "empty texts", "empty text file"])
def test_an_empty_shard(tmp_path, shards, bad):
    ext = {"zero bytes": ".jsonl", "no rows": ".parquet", "empty texts": ".jsonl", "empty text file": ".txt.gz"}[bad]
    for p in shards.glob("*.jsonl"):  # the good shards in the same format as the bad one
        write_documents(p.with_name(p.name.replace(".jsonl", ext)), [p.read_text()] if ext == ".txt.gz" else
                        [json.loads(line)["text"] for line in p.read_text().splitlines()])
    empty = shards / f"s1{ext}"
    if bad == "zero bytes":
        empty.write_bytes(b"")
    elif bad == "no rows":
        write_documents(empty, [])
    elif bad == "empty texts":
        write_documents(empty, ["", ""])
    else:
        write_documents(empty, [""])
    message = prepare_error(tmp_path, f"{shards}/*{ext}")
    assert message.startswith(str(empty)) and "(an empty shard)" in message and "remove it" in message


@pytest.mark.parametrize("ext", [".jsonl", ".jsonl.gz", ".txt"])
def test_a_line_that_is_not_utf8(tmp_path, shards, ext):
    bad = shards / f"bad{ext}"
    good = shards / f"good{ext}"
    if ext == ".txt":
        write_documents(good, ["a good document\nof two lines\n"])
        raw = b"first line\nsecond \xff\xfe line\n"
    else:
        write_documents(good, sample_documents(5))
        raw = b'{"text": "fine"}\n{"text": "bad \xff\xfe here"}\n'
    bad.write_bytes(__import__("gzip").compress(raw) if ext.endswith(".gz") else raw)
    message = prepare_error(tmp_path, f"{shards}/*{ext}")
    assert message.startswith(str(bad)) and "line 2 is not UTF-8" in message and "convert the file" in message


def test_a_line_that_is_not_json(tmp_path, shards):
    (shards / "s1.jsonl").write_text('{"text": "fine"}\n{"text": "unterminated\n')
    message = prepare_error(tmp_path, f"{shards}/*.jsonl")
    assert message.startswith(str(shards / "s1.jsonl")) and "line 2 is not JSON" in message


def test_mixed_schemas_across_shards(tmp_path, shards):
    write_documents(shards / "s2.jsonl", sample_documents(5), url=["u"] * 5)
    message = prepare_error(tmp_path, f"{shards}/*.jsonl")
    assert message.startswith(str(shards / "s2.jsonl")) and "mixed schemas" in message
    assert str(shards / "s0.jsonl") in message and "'url'" in message


def test_unknown_and_mixed_formats(tmp_path, shards):
    (shards / "notes.md").write_text("# notes\n")
    assert "notes.md: unknown format" in prepare_error(tmp_path, f"{shards}/*")
    (shards / "notes.md").unlink()
    write_documents(shards / "s3.parquet", sample_documents(4))
    assert "matches files of two formats" in prepare_error(tmp_path, f"{shards}/*")


def test_a_failure_half_way_leaves_finished_parts_and_no_complete_split(tmp_path, shards, monkeypatch):
    monkeypatch.setattr(lm.data.documents, "GROUP_BYTES", 1)  # one token file per shard
    train = write_documents(tmp_path / "train.jsonl", sample_documents(100, seed=21))
    (shards / "s2.jsonl").write_bytes((shards / "s2.jsonl").read_bytes() + b'{"text": "\xff"}\n')
    # the valid split is read only when it is tokenized: its first two shards are done when the third fails
    message = prepare_error(tmp_path, str(train), f"data.files.valid={shards}/*.jsonl",
                            f"data.files.test={train}")
    assert message.startswith(str(shards / "s2.jsonl")) and "line 51 is not UTF-8" in message
    folder = next((tmp_path / "cache" / "tokens").glob("*/valid-*/"))
    assert sorted(p.name for p in folder.iterdir()) == ["part-00000.bin", "part-00000.json", "part-00001.bin",
                                                        "part-00001.json"]
    assert not folder.with_suffix(".json").exists()


@pytest.mark.parametrize("overrides, message", [
    (["data.files.valid=a/*.jsonl"], "data.source=files needs data.files.train=GLOB"),
    (["data.path=/tmp", "data.files.train=a"], r"data.path \(a WikiText folder\) and data.files.train"),
    (["data.source=synthetic", "data.files.train=a"], "data.files.train is for data.source=files"),
    (["data.source=files"], "data.source=files needs data.files.train"),
    (["data.valid_fraction=0.5"], r"data.valid_fraction=0.5 must be a number in \(0, 0.5\)"),
    (["data.valid_fraction=0"], r"data.valid_fraction=0.0 must be"),
    (["data.source=synthetic", "data.text_field=content"], "data.text_field=content names a column"),
    (["data.files.train=a", "data.hf_rows=lines"], "data.hf_rows is for data.source=hf"),
    (["data.files.train=a", "data.hf_splits.valid=dev"], "data.hf_splits is for data.source=hf"),
    (["data.hf_rows=words"], r"data.hf_rows='words' is not one of"),
])
def test_contradictory_data_settings(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config([], overrides)
    assert "\n" not in str(info.value)


def test_hub_layout_dataset_errors(tmp_path):
    from datasets import Dataset, DatasetDict

    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_dict({"content": sample_documents(40)})}).save_to_disk(saved)
    base = [f"data.hf_name={saved}", "data.hf_config=null"]
    for overrides, expected in [([], r"saved:train has no column 'text' \(it has \['content'\]\)"),
                                (["data.text_field=content", "data.hf_splits.valid=dev"],
                                 "data.hf_splits.valid=dev: .* has no such split \\(it has \\['train'\\]\\)"),
                                (["data.text_field=content", "data.hf_rows=lines"],
                                 "has no 'valid' split .*data.hf_rows=documents")]:
        with pytest.raises(DataError, match=expected):
            prepare_corpus(doc_cfg(tmp_path / "cache", *base, *overrides))
