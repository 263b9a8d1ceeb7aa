"""Local lm-evaluation-harness tasks over a WikiText-format text file (``wiki.*.tokens``) or a file of documents
(JSONL / Parquet, the documents' text in one column): no hub needed.

:func:`write_tasks` writes into a directory (pass it as ``--include-path``) the documents as JSONL, one task
YAML each and the ``utils.py`` they reference:

- ``<prefix>_rolling``: rolling log-likelihood of each article (``loglikelihood_rolling``), the document-level
  perplexity of lm-eval's stock ``wikitext`` task on our own text. Metrics:

  - ``word_perplexity``: ``exp(-sum ll / sum (words + line ends))``, the WikiText-103 convention of the
    literature (words split on whitespace, one end-of-line token per line; an unterminated last line counts);
  - ``lm_eval_word_perplexity``: the same log-likelihood over lm-eval's stock word count,
    ``len(re.split(r"\\s+", page))``: the words plus one empty string at each end of a page that begins and ends
    with whitespace (a WikiText page begins with a space and ends with a newline), i.e. about words + 2 per
    page, so it reads ~1.8% x ln(ppl) higher than ``word_perplexity`` on WikiText-103;
  - ``byte_perplexity`` and ``bits_per_byte`` over the UTF-8 bytes (the only metrics for a file of documents,
    whose text need not be words).
- ``<prefix>_next_word``: multiple choice: a line's first words, then the true next word among
  ``num_choices - 1`` distractors drawn from the text's frequent words (``acc``, ``acc_norm``).

Articles start at a `` = Title = `` heading line; text before the first heading joins the first article, so the
documents concatenate to the file's text exactly. A file of documents gives one document per row (its text
column; empty rows are skipped), and its questions come from the documents' lines.
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

from lm.data import DataError, DocumentSource, LineEnds
from lm.data.files import file_kind, file_shards
from lm.eval.perplexity import word_level_tokens
from lm.fileio import atomic_write_text

_ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")


def wikitext_articles(text: str) -> list[str]:
    """The articles of a WikiText-format text, each with its lines' newlines; ``"".join(result) == text``."""
    docs: list[list[str]] = [[]]
    seen_heading = False
    for line in text.splitlines(keepends=True):
        if _ARTICLE_HEADING.match(line.rstrip("\n")):
            if seen_heading:
                docs.append([])
            seen_heading = True
        docs[-1].append(line)
    return ["".join(d) for d in docs if d]


def wikitext_word_count(text: str) -> int:
    """Words plus line ends (the WikiText-103 convention, counted as eval_ppl counts a split): whitespace-delimited
    words, plus one per line (:class:`lm.data.LineEnds`)."""
    line_ends = LineEnds()
    line_ends.add(text)
    return word_level_tokens(len(text.split()), line_ends.count)


def lm_eval_word_count(text: str) -> int:
    """lm-eval's stock ``wikitext`` task's word count of a page."""
    return len(re.split(r"\s+", text))


def rolling_process_results(doc: dict, results: list[float]) -> dict[str, tuple[float, int]]:
    """``process_results`` of the rolling task: (log-likelihood, count) pairs for the weighted aggregations."""
    (ll,) = results
    text = doc["text"]
    num_bytes = len(text.encode("utf-8"))
    return {"word_perplexity": (ll, wikitext_word_count(text)),
            "lm_eval_word_perplexity": (ll, lm_eval_word_count(text)),
            "byte_perplexity": (ll, num_bytes), "bits_per_byte": (ll, num_bytes)}


def document_process_results(doc: dict, results: list[float]) -> dict[str, tuple[float, int]]:
    """``process_results`` of the rolling task over a file of documents: per-byte metrics only."""
    (ll,) = results
    num_bytes = len(doc["text"].encode("utf-8"))
    return {"byte_perplexity": (ll, num_bytes), "bits_per_byte": (ll, num_bytes)}


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """The documents of a JSONL / Parquet file (``text_field`` of each row; empty rows skipped), read as
    ``data.files`` reads them (one-line :class:`DataError` for a bad file)."""
    import glob

    shards = file_shards(glob.escape(str(path)), str(path), text_field, None)
    return [text for text, _ in DocumentSource("test", shards, str(path), text_field).segments()]


def next_word_questions(text: str, num_questions: int, num_choices: int = 4, min_context_words: int = 8,
                        seed: int = 0) -> list[dict]:
    """Multiple-choice questions from ``text``'s paragraph lines: ``context`` (a line's leading space and first
    words), ``choices`` (words; lm-eval prepends the space) and ``label`` (index of the true next word).
    Deterministic for a given ``seed``; the true next word and the distractors are alphabetic words seen at
    least 5 times in the text."""
    rng = random.Random(seed)
    counts = Counter(w for w in text.split() if w.isalpha())
    pool = sorted(w for w, c in counts.items() if c >= 5)
    lines = [line for line in text.split("\n") if len(line.split()) > min_context_words + 1
             and not line.lstrip().startswith("=")]
    if len(pool) < num_choices or not lines:
        raise DataError(f"the text is too short to build next-word questions ({len(lines)} lines of more than "
                        f"{min_context_words + 1} words, {len(pool)} words seen 5 times or more; {num_choices} "
                        f"needed): give a longer text file")
    questions = []
    for line in rng.sample(lines, min(len(lines), 4 * num_questions)):
        words = line.split()
        cuts = [k for k in range(min_context_words, len(words)) if words[k] in counts and counts[words[k]] >= 5]
        if not cuts:
            continue
        k = rng.choice(cuts)
        answer = words[k]
        choices = rng.sample([w for w in pool if w != answer], num_choices - 1)
        label = rng.randrange(num_choices)
        choices.insert(label, answer)
        questions.append({"context": line[: len(line) - len(line.lstrip())] + " ".join(words[:k]),
                          "choices": choices, "label": label})
        if len(questions) == num_questions:
            break
    return questions


_UTILS = '"""process_results for the local tasks (written by lm.eval.harness_tasks)."""\n' \
         "from lm.eval.harness_tasks import document_process_results, rolling_process_results  # noqa: F401\n"


def _task_yaml(name: str, data: Path, output_type: str, body: str) -> str:
    """A task YAML over the JSONL file ``data`` (its ``test`` split): the shared head, then ``body``."""
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data))}
output_type: {output_type}
test_split: test
{body}metadata:
  version: 1.0
"""


def _rolling_body(process_results: str, metrics: tuple[str, ...]) -> str:
    """The body of a rolling task: each document scored whole, ``metrics`` from ``utils.<process_results>``."""
    aggregation = {"bits_per_byte": "bits_per_byte"}
    entries = "".join(f"  - metric: {m}\n    aggregation: {aggregation.get(m, 'weighted_perplexity')}\n"
                      f"    higher_is_better: false\n" for m in metrics)
    return (f'doc_to_text: ""\ndoc_to_target: "{{{{text}}}}"\nprocess_results: !function utils.{process_results}\n'
            f"metric_list:\n{entries}")


_ROLLING_BODY = _rolling_body("rolling_process_results",
                              ("word_perplexity", "lm_eval_word_perplexity", "byte_perplexity", "bits_per_byte"))
_DOCUMENT_ROLLING_BODY = _rolling_body("document_process_results", ("byte_perplexity", "bits_per_byte"))

_CHOICE_BODY = """doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_tasks(text_file: str | Path, out_dir: str | Path, prefix: str = "wikitext_local",
                num_questions: int = 200, num_choices: int = 4, seed: int = 0, text_field: str = "text") -> list[str]:
    """Write the two local tasks for ``text_file`` into ``out_dir`` (created; files of the same names are
    replaced, each atomically). ``text_file`` is WikiText-format text, or documents in a ``.jsonl`` / ``.json``
    (also ``.gz`` / ``.zst``) / ``.parquet`` file with their text in column ``text_field``. Returns the task
    names."""
    text_file, out_dir = Path(text_file), Path(out_dir)
    documents = file_kind(text_file) in ("json", "parquet")
    if documents:
        docs = read_documents(text_file, text_field)
        text, body = "\n".join(docs), _DOCUMENT_ROLLING_BODY
    else:
        text = text_file.read_text(encoding="utf-8")
        docs, body = wikitext_articles(text), _ROLLING_BODY
    rolling, choice = f"{prefix}_rolling", f"{prefix}_next_word"
    files = {f"{rolling}.jsonl": _jsonl([{"text": t} for t in docs]),
             f"{choice}.jsonl": _jsonl(next_word_questions(text, num_questions, num_choices, seed=seed)),
             f"{rolling}.yaml": _task_yaml(rolling, (out_dir / f"{rolling}.jsonl").resolve(), "loglikelihood_rolling",
                                           body),
             f"{choice}.yaml": _task_yaml(choice, (out_dir / f"{choice}.jsonl").resolve(), "multiple_choice",
                                          _CHOICE_BODY),
             "utils.py": _UTILS}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        atomic_write_text(out_dir / name, content)
    return [rolling, choice]
