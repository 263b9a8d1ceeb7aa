"""Passkey retrieval: a number hidden at a chosen depth of a long filler, asked for at the end, answered by greedy
decoding and scored exactly. Accuracy per (context, depth) says where in its window a model can still find a fact.

A prompt is token ids, ``context`` of them at most (BOS included)::

    [BOS] prefix  filler[:a]  needle  filler[a:]  question   ->  the model continues with  answer

- the **needle** states the value (``" The pass key is 68079. Remember it. 68079 is the pass key."``, or in the
  synthetic corpus's own format ``"facts : kelo is 37 ."``), the **question** asks for it, the **answer** is the value's
  tokens (``" 68079"``); the model decodes as many tokens greedily and is right only if they are exactly those;
- **depth** ``d`` puts the needle after the filler unit boundary closest to ``d`` times the filler length:
  ``0`` right after the prefix (farthest from the question), ``1`` right before the question;
- the **filler** fills the prompt up to ``context`` tokens: the run's own validation text (a random span of the
  token stream, any cut allowed), a built-in text, or filler in the synthetic corpus's format. Units are added
  while they fit, so a prompt is at most one unit shorter than ``context``;
- **trials** draw a new value (and key, and filler) from a seeded generator per (context, trial); the depths of one
  trial share them, so a row of the table differs only in where the needle sits.

Every text piece starts with a space or a newline: a tokenizer that starts a piece there (ours does) gives the
same ids for the pieces apart as for the joined text. The model is any causal LM
(:func:`lm.eval.position.logits_function`); decoding reruns the prompt plus the answer so far, one forward pass
per answer token (the answer is a few tokens), so it needs nothing of the model but its logits.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from lm.errors import UserError
from lm.eval.position import logits_function

__all__ = ["PasskeyError", "PasskeyTask", "PasskeyTrial", "PasskeyCell", "PasskeyReport", "passkey_task",
           "records_task", "build_prompt", "greedy_answers", "answer_nll", "evaluate_passkey", "BUILTIN_FILLER"]

Encode = Callable[[str], Sequence[int]]


class PasskeyError(UserError, ValueError):
    """A passkey evaluation that cannot be run as asked (a context too short for the prompt, a depth outside
    [0, 1]); the message says what to change."""

BUILTIN_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                  "There and back again.")
"""The filler sentences of the original passkey test (Mohtashami and Jaggi, 2023), repeated in this order."""


@dataclass
class PasskeyTrial:
    """One prompt: its token ids (BOS first), the answer's ids, and where the needle went."""

    ids: list[int]
    answer_ids: list[int]
    value: str
    key: str
    needle_start: int
    """Index in ``ids`` of the needle's first token."""
    depth: float
    """The depth asked for."""
    filler_before: int
    filler_tokens: int

    @property
    def actual_depth(self) -> float:
        """Filler tokens before the needle over all filler tokens (what ``depth`` became at a unit boundary)."""
        return self.filler_before / self.filler_tokens if self.filler_tokens else 0.0


@dataclass
class PasskeyTask:
    """How prompts are written (see the module docstring). ``needle``, ``question`` and ``answer`` are format
    strings over ``{key}`` and ``{value}``; ``filler(rng, key)`` yields the filler's units as token ids, forever;
    ``draw(rng)`` returns ``(key, value)`` of a trial."""

    name: str
    encode: Encode
    bos_id: int
    prefix: str
    needle: str
    question: str
    answer: str
    filler: Callable[[random.Random, str], Iterator[Sequence[int]]]
    draw: Callable[[random.Random], tuple[str, str]]
    description: str = ""
    chance: float = 0.0
    """The accuracy of the best guess that ignores the context (one value among those ``draw`` picks from)."""


def _encode(task: PasskeyTask, text: str) -> list[int]:
    return list(task.encode(text)) if text else []


def build_prompt(task: PasskeyTask, context: int, depth: float, rng: random.Random) -> PasskeyTrial:
    """A prompt of at most ``context`` tokens with the needle at ``depth`` (``0 <= depth <= 1``), drawn with
    ``rng``. The same ``rng`` state gives the same key, value and filler whatever the depth."""
    if not 0.0 <= depth <= 1.0:
        raise PasskeyError(f"depth={depth} must be in [0, 1] (a fraction of the filler)")
    key, value = task.draw(rng)
    prefix = _encode(task, task.prefix.format(key=key, value=value))
    needle = _encode(task, task.needle.format(key=key, value=value))
    question = _encode(task, task.question.format(key=key, value=value))
    budget = context - 1 - len(prefix) - len(needle) - len(question)
    if budget < 0:
        raise PasskeyError(f"context {context} is too short for the {task.name} prompt: it needs "
                           f"{context - budget} tokens without any filler; give a longer context")
    units: list[Sequence[int]] = []
    used = 0
    for unit in task.filler(rng, key):
        if used + len(unit) > budget:
            break
        units.append(unit)
        used += len(unit)
    bounds = np.cumsum([0, *map(len, units)])
    cut = int(np.abs(bounds - depth * used).argmin())  # the unit boundary closest to the depth asked for
    before = [t for u in units[:cut] for t in u]
    after = [t for u in units[cut:] for t in u]
    ids = [task.bos_id, *prefix, *before, *needle, *after, *question]
    return PasskeyTrial(ids, _encode(task, task.answer.format(key=key, value=value)), value, key,
                        1 + len(prefix) + len(before), depth, len(before), used)


# ------------------------------------------------------------------------------------------------ the two tasks
def _stream_filler(stream: np.ndarray | None, sentences: Sequence[Sequence[int]]):
    """Filler units: single tokens of ``stream`` from a random start (wrapping around), or ``sentences`` in
    order from a random one."""
    def filler(rng: random.Random, key: str) -> Iterator[Sequence[int]]:
        if stream is not None:
            i = rng.randrange(len(stream))
            while True:
                yield (int(stream[i]),)
                i = (i + 1) % len(stream)
        i = rng.randrange(len(sentences))
        while True:
            yield sentences[i]
            i = (i + 1) % len(sentences)
    return filler


def passkey_task(encode: Encode, bos_id: int, filler_tokens: np.ndarray | None = None, digits: int = 5
                 ) -> PasskeyTask:
    """The passkey test of Mohtashami and Jaggi (2023) for a model of natural text: a ``digits``-digit number in
    ``filler_tokens`` (e.g. the run's validation split, as one token stream; at least 1 token) or, when None,
    the built-in sentences of :data:`BUILTIN_FILLER`."""
    if digits < 1:
        raise ValueError(f"digits={digits} must be >= 1")
    if filler_tokens is not None and len(filler_tokens) < 1:
        raise ValueError("the filler text is empty")
    sentences = [list(encode(" " + s)) for s in BUILTIN_FILLER]

    def draw(rng: random.Random) -> tuple[str, str]:
        return "pass key", str(rng.randrange(10 ** (digits - 1), 10 ** digits))
    source = "validation text" if filler_tokens is not None else "built-in sentences"
    return PasskeyTask(
        "passkey", encode, bos_id,
        prefix="There is an important number hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about it.",
        needle=" The pass key is {value}. Remember it. {value} is the pass key.",
        question=" What is the pass key? The pass key is", answer=" {value}",
        filler=_stream_filler(filler_tokens, sentences), draw=draw,
        description=f"a {digits}-digit pass key in {source}", chance=1 / (9 * 10 ** (digits - 1)))


def records_task(encode: Encode, bos_id: int, keys: Sequence[str], num_values: int, sentence,
                 fact: str = "{key} is {value} .", question: str = "what is {key} ?") -> PasskeyTask:
    """The passkey test in the synthetic corpus's own format (:mod:`lm.data.synthetic`): one fact
    ``"facts : kelo is 37 ."`` hidden among the corpus's filler sentences (``sentence(rng)`` draws one), then the
    corpus's question ``"questions : what is kelo ?"``. ``fact`` and ``question`` are the corpus's style
    (``lm.data.synthetic.STYLES``; these defaults are its ``sentences`` style). ``keys`` are the corpus's keys,
    values ``0 .. num_values - 1``; the filler holds no other fact, so finding the one number is the whole task.
    With the needle last (depth 1) the prompt's end is a record of the corpus exactly (a fact line, then the
    question line)."""
    if not keys or num_values < 1:
        raise ValueError("records_task needs at least one key and one value")

    def draw(rng: random.Random) -> tuple[str, str]:
        return rng.choice(list(keys)), str(rng.randrange(num_values))

    def filler(rng: random.Random, key: str) -> Iterator[Sequence[int]]:
        while True:
            yield list(encode(" " + sentence(rng)))
    return PasskeyTask("records", encode, bos_id, prefix="= record =", needle="\nfacts : " + fact,
                       question="\nquestions : " + question, answer=" {value}", filler=filler, draw=draw,
                       description="a fact of the synthetic corpus among its filler sentences",
                       chance=1 / num_values)


# ------------------------------------------------------------------------------------------------ decoding
@torch.no_grad()
def greedy_answers(model, prompts: Sequence[Sequence[int]], num_tokens: int, device: str | torch.device = "cpu"
                   ) -> list[list[int]]:
    """``num_tokens`` greedily decoded tokens after each prompt (all of one length), batched: each step runs
    the prompts plus the tokens chosen so far and takes the argmax of the last position's logits."""
    lengths = {len(p) for p in prompts}
    if len(lengths) != 1:
        raise ValueError(f"greedy_answers batches prompts of one length, got lengths {sorted(lengths)}")
    logits_of = logits_function(model)
    ids = torch.tensor([list(p) for p in prompts], dtype=torch.int64, device=device)
    chosen = []
    for _ in range(num_tokens):
        nxt = logits_of(ids)[:, -1].argmax(-1)
        chosen.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    if not chosen:
        return [[] for _ in prompts]
    return torch.stack(chosen, 1).cpu().tolist()


@torch.no_grad()
def answer_nll(model, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
               device: str | torch.device = "cpu") -> list[float]:
    """Negative log-likelihood (nats, summed over its tokens) of each answer after its prompt, teacher-forced:
    one forward pass over ``prompt + answer[:-1]`` (all of one length). How much probability the model puts on
    the value even where greedy decoding misses it."""
    lengths = {len(p) + len(a) for p, a in zip(prompts, answers)}
    if len(lengths) != 1 or any(len(a) < 1 for a in answers):
        raise ValueError("answer_nll batches prompt + answer of one length, each answer at least one token")
    logits_of = logits_function(model)
    ids = torch.tensor([[*p, *a[:-1]] for p, a in zip(prompts, answers)], dtype=torch.int64, device=device)
    rows = [r for r, a in enumerate(answers) for _ in a]  # one entry per answer token: its row, position, id
    pos = [len(p) - 1 + i for p, a in zip(prompts, answers) for i in range(len(a))]
    target = [t for a in answers for t in a]
    logp = torch.log_softmax(logits_of(ids).double(), dim=-1)
    picked = -logp[torch.tensor(rows, device=logp.device), torch.tensor(pos, device=logp.device),
                   torch.tensor(target, device=logp.device)]  # (tokens,)
    per_row = torch.zeros(len(answers), dtype=picked.dtype, device=picked.device)
    return per_row.index_add_(0, torch.tensor(rows, device=picked.device), picked).tolist()  # one device read


# ------------------------------------------------------------------------------------------------ evaluation
@dataclass
class PasskeyCell:
    """Accuracy at one (context, depth)."""

    context: int
    depth: float
    trials: int
    correct: int
    mean_prompt_tokens: float
    mean_actual_depth: float
    mean_answer_nll: float
    """Mean NLL of the whole answer, teacher-forced (nats; guessing uniformly among ``V`` values scores
    ``ln V``)."""

    @property
    def accuracy(self) -> float:
        return self.correct / self.trials


@dataclass
class PasskeyReport:
    """Every cell and every trial of :func:`evaluate_passkey`."""

    task: str
    description: str
    chance: float
    """Accuracy of a guess that ignores the context."""
    contexts: list[int]
    depths: list[float]
    trials: int
    seed: int
    cells: list[PasskeyCell]
    samples: list[dict] = field(default_factory=list)
    """Per trial: context, depth, trial, key, value, the greedy answer's ids (and text, when a ``decode`` was
    given), correct, the true answer's NLL."""

    def accuracy(self) -> np.ndarray:
        """``(len(contexts), len(depths))`` accuracies."""
        table = {(c.context, c.depth): c.accuracy for c in self.cells}
        return np.array([[table[(ctx, d)] for d in self.depths] for ctx in self.contexts])

    def answer_nll(self) -> np.ndarray:
        """``(len(contexts), len(depths))`` mean answer NLLs (nats)."""
        table = {(c.context, c.depth): c.mean_answer_nll for c in self.cells}
        return np.array([[table[(ctx, d)] for d in self.depths] for ctx in self.contexts])

    def to_dict(self) -> dict:
        out = asdict(self)
        for cell, row in zip(out["cells"], self.cells):
            cell["accuracy"] = row.accuracy
        out["accuracy"] = self.accuracy().tolist()
        out["answer_nll"] = self.answer_nll().tolist()
        return out


def trial_rng(seed: int, context: int, trial: int) -> random.Random:
    """The generator of one trial: the same for every depth (string seeds hash the same on every platform)."""
    return random.Random(f"passkey/{seed}/{context}/{trial}")


def evaluate_passkey(model, task: PasskeyTask, contexts: Sequence[int], depths: Sequence[float], trials: int = 10,
                     seed: int = 0, batch_size: int = 8, device: str | torch.device = "cpu",
                     decode: Callable[[Sequence[int]], str] | None = None, progress: bool = False
                     ) -> PasskeyReport:
    """Passkey accuracy of ``model`` (any causal LM, on ``device``) at each context and depth, ``trials`` prompts
    per cell (:func:`build_prompt`), answers decoded greedily (:func:`greedy_answers`) and right only when every
    token is the answer's; also the true answer's teacher-forced NLL (:func:`answer_nll`). ``decode`` (ids ->
    text) records each answer's text in the samples."""
    if trials < 1 or batch_size < 1:
        raise ValueError(f"trials={trials} and batch_size={batch_size} must be >= 1")
    if not contexts or not depths:
        raise ValueError("give at least one context and one depth")
    module = model if isinstance(model, torch.nn.Module) else None
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    prompts = [(ctx, d, t, build_prompt(task, ctx, d, trial_rng(seed, ctx, t)))
               for ctx in contexts for t in range(trials) for d in depths]
    by_length: dict[tuple[int, int], list] = {}
    for p in prompts:
        by_length.setdefault((len(p[3].ids), len(p[3].answer_ids)), []).append(p)
    answers: dict[tuple, list[int]] = {}
    nlls: dict[tuple, float] = {}
    bar = tqdm(total=len(prompts), unit="prompt", desc="passkey", disable=not progress, dynamic_ncols=True)
    try:
        for group in by_length.values():
            for a in range(0, len(group), batch_size):
                chunk = group[a:a + batch_size]
                got = greedy_answers(model, [p[3].ids for p in chunk], len(chunk[0][3].answer_ids), device)
                nll = answer_nll(model, [p[3].ids for p in chunk], [p[3].answer_ids for p in chunk], device)
                for p, g, x in zip(chunk, got, nll):
                    answers[p[:3]], nlls[p[:3]] = g, x
                bar.update(len(chunk))
    finally:
        bar.close()
        if module is not None:
            module.train(was_training)
    cells, samples = [], []
    for ctx in contexts:
        for d in depths:
            rows = [(t, trial) for c, dd, t, trial in prompts if c == ctx and dd == d]
            correct = [answers[(ctx, d, t)] == trial.answer_ids for t, trial in rows]
            cells.append(PasskeyCell(ctx, d, len(rows), sum(correct),
                                     float(np.mean([len(trial.ids) for _, trial in rows])),
                                     float(np.mean([trial.actual_depth for _, trial in rows])),
                                     float(np.mean([nlls[(ctx, d, t)] for t, _ in rows]))))
            for (t, trial), ok in zip(rows, correct):
                sample = {"context": ctx, "depth": d, "trial": t, "key": trial.key, "value": trial.value,
                          "answer_ids": answers[(ctx, d, t)], "correct": ok, "answer_nll": nlls[(ctx, d, t)]}
                if decode is not None:
                    sample["answer"] = decode(answers[(ctx, d, t)])
                samples.append(sample)
    return PasskeyReport(task.name, task.description, task.chance, list(contexts), list(depths), trials, seed, cells,
                         samples)
