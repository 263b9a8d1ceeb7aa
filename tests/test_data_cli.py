"""The command lines on a documents corpus: training from JSONL shards with a carved-out valid split, then
tools/prepare_data.py, tools/eval_ppl.py (token perplexity and bits per byte, no word perplexity; per document)
and the harness's local tasks over a file of documents."""
import json
import math
from pathlib import Path

import pytest
import yaml

from conftest import sample_documents, train_run, write_documents
from lm.cli.eval_ppl import main as eval_ppl_main
from lm.cli.prepare_data import main as prepare_data_main
from lm.eval.harness_tasks import write_tasks


@pytest.fixture(scope="module")
def documents_run(tmp_path_factory) -> Path:
    """A tiny model trained 4 steps on four JSONL shards, valid carved out (10% of the documents), test given."""
    root = tmp_path_factory.mktemp("documents")
    docs = sample_documents(800, seed=30)
    for k in range(4):
        write_documents(root / "shards" / f"train-{k:05d}.jsonl.gz", docs[200 * k:200 * (k + 1)])
    write_documents(root / "shards" / "test.jsonl", sample_documents(20, seed=31))
    return train_run(root, "data.source=files", f"data.files.train={root}/shards/train-*.jsonl.gz",
                     f"data.files.test={root}/shards/test.jsonl", "data.valid_fraction=0.1", "data.seq_len=32",
                     "data.tokenizer.vocab_size=400", "max_steps=4", "eval_every=4", "eval_batches=0")


def logged(run: Path, tag: str) -> float:
    from conftest import scalars
    return scalars(run, tag)[4]


def test_eval_ppl_on_a_documents_corpus(documents_run, tmp_path, capsys):
    out = tmp_path / "valid.json"
    assert eval_ppl_main([str(documents_run), "--json", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().out
    (row,) = json.loads(out.read_text())["results"]
    assert row["token_perplexity"] == pytest.approx(logged(documents_run, "valid/ppl"), rel=1e-5)
    assert row["word_perplexity"] is None and row["num_word_level_tokens"] is None
    assert row["bits_per_byte"] == pytest.approx(row["nll_sum"] / (math.log(2) * row["num_bytes"]))
    assert 40 <= row["num_documents"] <= 130 and not row["per_document"]
    assert "docs" in table.splitlines()[0] and "no word ppl" in table

    per_doc = tmp_path / "per_doc.json"
    assert eval_ppl_main([str(documents_run), "--split", "test", "--per-document", "--context", "16",
                          "--json", str(per_doc), "--no-progress"]) == 0
    (row,) = json.loads(per_doc.read_text())["results"]
    assert row["per_document"] and row["num_documents"] == 20 and row["context"] == 16
    assert "each document on its own" in capsys.readouterr().out


def test_prepare_data_reports_documents(documents_run, tmp_path, capsys):
    config = documents_run / "config.yaml"
    assert prepare_data_main([str(config)]) == 0  # everything is in the cache already
    lines = capsys.readouterr().out.splitlines()
    assert "built: nothing" in lines[0]
    valid = next(line for line in lines if line.startswith("valid"))
    assert " docs " in valid and valid.rstrip().endswith(tuple("0123456789abcdef"))  # the token folder


def test_harness_tasks_over_a_file_of_documents(tmp_path):
    docs = [" ".join(["the quiet river moves under the old stone bridge"] * 3) + f" {k}" for k in range(30)]
    source = write_documents(tmp_path / "docs.parquet", ["", *docs], text_field="body")
    rolling, choice = write_tasks(source, tmp_path / "tasks", prefix="mine", num_questions=4, text_field="body")
    rows = [json.loads(line)["text"] for line in (tmp_path / "tasks" / f"{rolling}.jsonl").read_text().splitlines()]
    assert rows == docs  # one task document per row, the empty row skipped
    task = yaml.safe_load((tmp_path / "tasks" / f"{rolling}.yaml").read_text().replace("!function", ""))
    assert [m["metric"] for m in task["metric_list"]] == ["byte_perplexity", "bits_per_byte"]
    assert "document_process_results" in task["process_results"]
    assert len((tmp_path / "tasks" / f"{choice}.jsonl").read_text().splitlines()) == 4
    from lm.cli.harness_tasks import main as harness_tasks_main  # the command line: the same, --text-field body
    assert harness_tasks_main([str(source), str(tmp_path / "cli"), "--prefix", "mine", "--num-questions", "4",
                               "--text-field", "body"]) == 0
    assert (tmp_path / "cli" / f"{rolling}.jsonl").read_text() == (tmp_path / "tasks" / f"{rolling}.jsonl").read_text()


def test_harness_rolling_task_on_documents_scores_each_document_from_bos(documents_run, tmp_path):
    pytest.importorskip("lm_eval")
    from lm.cli.harness import main as harness_main
    from lm.eval.perplexity import score_tokens
    from lm.inference.loading import load_for_inference

    docs = sample_documents(12, seed=32)
    rolling, _ = write_tasks(write_documents(tmp_path / "docs.jsonl", docs), tmp_path / "tasks", prefix="mine",
                             num_questions=1)
    out = tmp_path / "harness.json"
    assert harness_main([str(documents_run), "--tasks", rolling, "--include-path", str(tmp_path / "tasks"),
                         "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())["results"][rolling]
    assert metrics["sample_len"] == 12 and "word_perplexity,none" not in metrics
    inference = load_for_inference(documents_run)
    tok, context = inference.tokenizer, inference.cfg.data.seq_len
    nll = sum(score_tokens(inference.model, tok.encode_array(d), context, context, 4, tok.bos_id).nll_sum
              for d in docs)
    num_bytes = sum(len(d.encode()) for d in docs)
    assert metrics["bits_per_byte,none"] == pytest.approx(nll / (math.log(2) * num_bytes), rel=1e-4)
