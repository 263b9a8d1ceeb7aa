"""The one typed configuration tree: OmegaConf structured dataclasses + YAML files + ``key=value`` overrides.

Built once in ``main`` by :func:`load_config` and passed down; never global. Every field's docstring-comment is
its help text. Unknown keys and wrong types are errors that name the key. ``__post_init__`` validates values.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lm.config.model import (AttentionConfig, ConfigError, ModelConfig, _choice, _in_range, _positive,  # noqa: F401
                             check_buckets, model_config_from_dict)


SEED_LIMIT = 2 ** 63
"""Seeds are integers in [0, SEED_LIMIT): what torch, numpy and the per-step seeds (lm.training.loop) all take."""


def _seed(name: str, value) -> None:
    if not 0 <= value < SEED_LIMIT:
        raise ConfigError(f"{name}={value} must be an integer in [0, 2**63 - 1], e.g. {name}=1234")


@dataclass
class TokenizerConfig:
    vocab_size: int = 16000
    model_type: str = "bpe"
    """bpe | unigram (SentencePiece)."""
    character_coverage: float = 1.0
    max_sentence_length: int = 16384
    """Longest line (in bytes) SentencePiece trains on; longer lines are split."""
    train_max_bytes: int = 200_000_000
    """Train the tokenizer on at most this many bytes of the train split (sampled by whole lines)."""
    num_threads: int = 8
    """Threads SentencePiece trains with. Its result depends on the thread count, so this is a fixed setting
    (part of the tokenizer's cache key) rather than the machine's core count: same data + settings, same
    tokenizer on every machine."""

    def __post_init__(self) -> None:
        _choice("data.tokenizer.model_type", self.model_type, ["bpe", "unigram"])
        if self.vocab_size < 260:
            raise ConfigError(f"data.tokenizer.vocab_size={self.vocab_size} is too small: it includes 256 byte "
                              f"pieces, <unk>, <s>, </s> and the newline symbol (use >= 260)")
        if not 0.0 < self.character_coverage <= 1.0:
            raise ConfigError(f"data.tokenizer.character_coverage={self.character_coverage} must be in (0, 1]")
        _positive("data.tokenizer.max_sentence_length", self.max_sentence_length)
        _positive("data.tokenizer.train_max_bytes", self.train_max_bytes)
        _positive("data.tokenizer.num_threads", self.num_threads)


@dataclass
class SyntheticConfig:
    seed: int = 1234
    train_tokens: int = 2_000_000
    """Approximate size of the synthetic train split in whitespace words, about 1.2 tokens each (valid and test
    are a tenth each)."""
    num_keys: int = 64
    """Associative-recall alphabet size: distinct keys the model must bind and recall."""
    num_values: int = 100
    """Values are the numbers 0 .. num_values - 1."""
    num_pairs: int = 8
    """Key-value bindings listed (and later queried) per record."""
    filler_sentences: int = 8
    """Sentences (about 6 tokens each) between the listing and the queries: the recall distance."""
    random_filler: bool = False
    """Give each record a uniformly random number of filler sentences, 0 to filler_sentences, so that the distance
    from a fact to its question varies and position alone cannot find the fact."""
    style: str = "sentences"
    """How facts and questions are written. sentences: ``kelo is 37 .`` then ``what is kelo ? 37 .``; pairs:
    ``kelo 37 .`` in both the listing and the questions, so the value follows its key in both places (recall is
    one copy: find the key's earlier occurrence, say the token after it)."""

    def __post_init__(self) -> None:
        _choice("data.synthetic.style", self.style, ["sentences", "pairs"])
        for k in ("train_tokens", "num_keys", "num_values", "num_pairs"):
            _positive(f"data.synthetic.{k}", getattr(self, k))
        _seed("data.synthetic.seed", self.seed)
        if self.num_pairs > self.num_keys:
            raise ConfigError(f"data.synthetic.num_pairs={self.num_pairs} must be <= "
                              f"data.synthetic.num_keys={self.num_keys}")
        if self.filler_sentences < 0:
            raise ConfigError("data.synthetic.filler_sentences must be >= 0")


@dataclass
class DataFilesConfig:
    """Local files by glob, one per split (``**`` matches folders recursively), read as documents: one per JSONL
    line / Parquet row (its data.text_field), one per .txt file. Formats: .jsonl .json .parquet .txt, and .jsonl,
    .json, .txt compressed as .gz or .zst."""

    train: Optional[str] = None
    """Glob of the train files, e.g. shards/train-*.jsonl.gz. Setting it selects data.source=files."""
    valid: Optional[str] = None
    """Glob of the valid files; null = carve data.valid_fraction of the train documents out."""
    test: Optional[str] = None
    """Glob of the test files; null = carve data.valid_fraction of the train documents out."""


@dataclass
class HubSplitsConfig:
    """The hub dataset's split names for our train, valid and test splits."""

    train: str = "train"
    valid: Optional[str] = None
    """null = "validation" or "valid" when the dataset has it; otherwise (documents) carved out of train."""
    test: Optional[str] = None
    """null = "test" when the dataset has it; otherwise (documents) carved out of train."""


@dataclass
class DataConfig:
    source: str = "hf"
    """hf (Hugging Face datasets hub, or a folder written by save_to_disk) | local (WikiText files under
    data.path) | files (documents by glob: data.files) | synthetic (built in, no download). Setting data.path
    selects local; setting data.files.train selects files."""
    path: Optional[str] = None
    """Directory with wiki.{train,valid,test}.tokens / .raw or {train,valid,test}.txt."""
    files: DataFilesConfig = field(default_factory=DataFilesConfig)
    text_field: str = "text"
    """The column holding the text (JSONL key, Parquet or hub column) for data.files and hub datasets."""
    valid_fraction: float = 0.005
    """A documents corpus without a valid split gets this fraction of its train documents as one, chosen by a
    hash of each document's text (deterministic, disjoint from train); a missing test split takes another
    fraction of the same size."""
    hf_name: str = "wikitext"
    """A dataset on the Hugging Face hub, or a folder written by datasets' save_to_disk."""
    hf_config: Optional[str] = "wikitext-103-raw-v1"
    """wikitext-103-raw-v1 (raw text) or wikitext-103-v1 (tokenized, with <unk>); null for datasets without
    configs."""
    hf_splits: HubSplitsConfig = field(default_factory=HubSplitsConfig)
    hf_rows: str = "auto"
    """What a row of the hub dataset is: documents (an EOS token ends each) | lines (of one running text, no EOS,
    word-level perplexity: WikiText's layout) | auto (lines for wikitext, documents for any other dataset)."""
    cache_dir: str = "cache"
    """Where tokenizers and memory-mapped token caches are kept (shared by runs, keyed by fingerprints)."""
    seq_len: int = 512
    """Training context length in tokens."""
    document_mask: bool = False
    """Documents of a packed window do not attend to each other: each token sees only its own document (which
    begins at the EOS ending the one before), in training and in validation / eval_ppl. Needs a corpus of
    documents (data.files, a hub dataset of documents), not a text of lines (WikiText, synthetic)."""
    num_proc: int = 0
    """Processes for tokenization; 0 = all cores."""
    progress: bool = True
    """Show progress bars while preparing data (on a terminal only: none in a log file)."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        files_given = [k for k in ("train", "valid", "test") if getattr(self.files, k) is not None]
        if self.path is not None and files_given:
            raise ConfigError(f"data.path (a WikiText folder) and data.files.{files_given[0]} (globs) are two "
                              f"sources: set one of them")
        if self.path is not None:
            self.source = "local"
        if files_given:
            if self.source not in ("hf", "files"):  # hf is the default, so it cannot have been chosen on purpose
                raise ConfigError(f"data.files.{files_given[0]} is for data.source=files, not data.source="
                                  f"{self.source}: drop one of them")
            self.source = "files"
        _choice("data.source", self.source, ["hf", "local", "files", "synthetic"])
        if self.source == "local" and not self.path:
            raise ConfigError("data.source=local needs data.path=DIR (a folder with wiki.{train,valid,test}.tokens "
                              "or {train,valid,test}.txt)")
        if self.source == "files" and not self.files.train:
            raise ConfigError("data.source=files needs data.files.train=GLOB (e.g. 'shards/train-*.jsonl.gz'); "
                              "data.files.valid and data.files.test are optional")
        if not self.text_field:
            raise ConfigError("data.text_field must name the column that holds the text, e.g. text")
        if self.text_field != "text" and self.source in ("local", "synthetic"):
            raise ConfigError(f"data.text_field={self.text_field} names a column of data.files or a hub dataset; "
                              f"data.source={self.source} reads plain text: drop it")
        _in_range("data.valid_fraction", self.valid_fraction, 0.0, 0.5, low_open=True, high_open=True,
                  hint=" (the share of documents carved out as a missing valid or test split)")
        _choice("data.hf_rows", self.hf_rows, ["auto", "documents", "lines"])
        if self.source != "hf":
            if self.hf_rows != "auto":
                raise ConfigError(f"data.hf_rows is for data.source=hf, not data.source={self.source}: drop it")
            if self.hf_splits != HubSplitsConfig():
                raise ConfigError(f"data.hf_splits is for data.source=hf, not data.source={self.source}: drop it")
        _positive("data.seq_len", self.seq_len)
        if self.num_proc < 0:
            raise ConfigError("data.num_proc must be >= 0 (0 = all cores)")


@dataclass
class OptimConfig:
    lr: float = 5e-4
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 2000
    schedule: str = "cosine"
    """cosine (linear warmup then cosine decay) | constant (linear warmup then constant)."""
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""

    def __post_init__(self) -> None:
        inf = math.inf
        _in_range("optim.lr", self.lr, 0.0, inf, low_open=True, high_open=True, hint=", e.g. 3e-4")
        _in_range("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0,
                  hint=" (the cosine ends at lr x min_lr_ratio; below 0 the update would climb the loss)")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        _choice("optim.schedule", self.schedule, ["cosine", "constant"])
        _in_range("optim.weight_decay", self.weight_decay, 0.0, inf, high_open=True)
        _in_range("optim.beta1", self.beta1, 0.0, 1.0, high_open=True, hint=", e.g. 0.9")
        _in_range("optim.beta2", self.beta2, 0.0, 1.0, high_open=True, hint=", e.g. 0.98")
        _in_range("optim.eps", self.eps, 0.0, inf, low_open=True, high_open=True, hint=", e.g. 1e-8")
        _in_range("optim.grad_clip", self.grad_clip, 0.0, inf, high_open=True, hint=" (0 disables clipping)")


@dataclass
class DivergenceConfig:
    """When a step is bad (skipped) and when a run stops for divergence (see README, "What happens when things go
    wrong")."""

    max_bad_steps: int = 5
    """Stop after this many bad steps in a row. A bad step has a non-finite loss or gradients, or a loss spike;
    it is skipped (weights and optimizer state untouched) and no checkpoint is written until a good step."""
    spike_factor: float = 1.5
    """A step whose loss exceeds spike_factor x the median loss of the last spike_window good steps is a loss
    spike, a bad step. 0 = off (only non-finite steps are bad)."""
    spike_window: int = 20
    """Good steps whose median is the spike rule's reference (fewer while the run is younger than that; the rule
    is armed from the first good step)."""
    final_loss_factor: float = 1.5
    """A run whose final loss (median of the last spike_window good steps) exceeds final_loss_factor x its first
    step's loss fails (exit status 3) even if no step was bad. 0 = off."""

    def __post_init__(self) -> None:
        _positive("divergence.max_bad_steps", self.max_bad_steps)
        _positive("divergence.spike_window", self.spike_window)
        for key in ("spike_factor", "final_loss_factor"):
            value = getattr(self, key)
            if not (value == 0 or (math.isfinite(value) and value > 1)):
                raise ConfigError(f"divergence.{key}={value!r} must be 0 (off) or a number > 1, e.g. 1.5")


@dataclass
class ComputeConfig:
    """How the training step computes, whichever engine runs it (DeepSpeed or plain torch)."""

    precision: str = "fp32"
    """fp32 | bf16 | fp16: mixed precision of forward and backward (bf16: autocast under the plain-torch engine,
    DeepSpeed's bf16 mode under DeepSpeed; fp16 needs DeepSpeed's loss scaling). Weights and optimizer state stay
    fp32; the kernelized op keeps its FFT in fp32 or better."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward to save memory."""
    tf32: bool = True
    """On CUDA, let float32 matmuls and cuDNN convolutions use TF32 tensor cores (inputs rounded to a 10-bit
    mantissa, fp32 accumulation). Set when the training engine, eval_ppl and generate start; false = full fp32.
    No effect on CPU."""

    cpu_threads: int = 1
    """torch's intra-op threads in each process (training ranks, eval_ppl, generate, harness). 1 (default): one
    thread, the same speed on a busy machine as on an idle one, and the same numbers on every machine; N: N threads
    (faster on idle cores for large CPU batches, but when other processes take cores every kernel waits for its
    slowest thread: on a busy 2-core machine 2 threads trained the smoke model 3.6x and decoded 11x slower than 1);
    0: leave torch's own choice (OMP_NUM_THREADS, else one per core). Not part of the run: a resume may change it."""

    def __post_init__(self) -> None:
        _choice("compute.precision", self.precision, ["fp32", "bf16", "fp16"])
        if self.cpu_threads < 0:
            raise ConfigError(f"compute.cpu_threads={self.cpu_threads} must be >= 0 (1 = one thread, the default; "
                              f"0 = torch's own choice)")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    """ZeRO stage 0, 1 or 2."""
    torch_adam: bool = True
    """Use torch's AdamW (no extension to compile). false: DeepSpeed's fused (GPU) / CPU Adam, compiled on first
    start; it cannot skip non-finite steps with zero_stage=0 and compute.precision=fp32, so that combination is
    refused."""
    sequence_parallel_size: int = 1
    """Ulysses sequence parallelism (DeepSpeed engine only): each sequence is split over this many consecutive
    ranks, which exchange heads for tokens around attention (all-to-all); data parallelism takes the rest of the
    ranks. Must divide the number of ranks, model.n_heads and data.seq_len. 1 = off."""

    def __post_init__(self) -> None:
        _choice("deepspeed.zero_stage", self.zero_stage, [0, 1, 2])
        _positive("deepspeed.sequence_parallel_size", self.sequence_parallel_size)


STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT", "SIGXCPU")
"""The signals ``preemption.signals`` may name: those schedulers and people send to end a job."""


@dataclass
class PreemptionConfig:
    """How a run stops early and cleanly when asked to (docs/clusters.md): every rank finishes the step in flight,
    the step is saved, and the trainer exits with status 75 (re-running the same command resumes)."""

    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    """Signals that stop training after the step in flight, with a checkpoint of it (any rank receiving one is
    enough). [] = none: a signal then ends the process at once, as without this."""
    requeue: bool = False
    """Under SLURM (SLURM_JOB_ID set): after a stop by time_limit_minutes or by a signal other than SIGTERM and
    SIGINT (e.g. sbatch --signal=USR1@120), rank 0 runs `scontrol requeue $SLURM_JOB_ID` before exiting.
    SIGTERM (scancel) and SIGINT (Ctrl-C) never requeue."""

    def __post_init__(self) -> None:
        for name in self.signals:
            if name not in STOP_SIGNALS:
                raise ConfigError(f"preemption.signals: {name!r} is not one of {list(STOP_SIGNALS)} (e.g. "
                                  f"preemption.signals=[SIGTERM,SIGUSR1]; [] handles none)")
        if len(set(self.signals)) != len(self.signals):
            raise ConfigError(f"preemption.signals={list(self.signals)} names a signal twice")


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    """Directory of this run: config.yaml, tokenizer, TensorBoard events, checkpoints."""
    seed: int = 1234
    batch_size: int = 64
    """Global batch in sequences per optimizer step (all ranks and accumulation steps together)."""
    micro_batch_size: int = 8
    """Sequences per rank per forward/backward; accumulation = batch_size / (micro_batch_size * world)."""
    max_steps: int = 150_000
    """Length of the run (the learning-rate schedule ends here)."""
    stop_at: int = 0
    """Stop (with a checkpoint) after this step without changing the schedule, e.g. for a job with a time limit;
    re-running the same command with a larger stop_at (or 0 = max_steps) continues exactly. 0 = max_steps."""
    log_every: int = 50
    eval_every: int = 2000
    eval_batches: int = 50
    """Validation batches per evaluation; 0 = the whole valid split."""
    save_every: int = 5000
    keep_checkpoints: int = 3
    resume: bool = True
    """Continue from the newest checkpoint in run_dir when there is one."""
    device: str = "auto"
    """auto | cpu | cuda."""
    engine: str = "auto"
    """auto (DeepSpeed when started by launch.sh / the deepspeed launcher, else plain torch) | deepspeed | torch."""
    eval_stride: int = 0
    """Validation window stride in tokens (each scored token sees >= seq_len - stride of history); 0 = seq_len."""
    save_every_minutes: float = 0.0
    """Also save after the step during which this many minutes of wall clock have passed since the last save (or
    the start of this command), whatever save_every says; all ranks agree. 0 = off."""
    time_limit_minutes: float = 0.0
    """Stop with a checkpoint (exit status 75, like a preemption) after the step that leaves less than one more
    step's time before this many minutes since the start of this command; leave room for one save in a job's
    limit. Re-running the same command continues exactly. 0 = off."""
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def __post_init__(self) -> None:
        for k in ("batch_size", "micro_batch_size", "max_steps", "log_every", "save_every", "keep_checkpoints"):
            _positive(k, getattr(self, k))
        _seed("seed", self.seed)
        for k in ("save_every_minutes", "time_limit_minutes"):
            _in_range(k, getattr(self, k), 0.0, math.inf, high_open=True, hint=" (0 = off)")
        sp = self.deepspeed.sequence_parallel_size
        if self.model.n_heads % sp:
            raise ConfigError(f"deepspeed.sequence_parallel_size={sp} must divide model.n_heads={self.model.n_heads} "
                              f"(each rank attends over whole heads); choose a divisor of {self.model.n_heads}")
        if self.data.seq_len % sp:
            raise ConfigError(f"data.seq_len={self.data.seq_len} must be divisible by deepspeed.sequence_parallel_size="
                              f"{sp} (each rank holds seq_len / {sp} tokens); change data.seq_len")
        # the world size is known only at start (checked again then); the smallest world that fits is one SP group
        self.gradient_accumulation_steps(world_size=sp)
        _choice("device", self.device, ["auto", "cpu", "cuda"])
        if self.stop_at < 0:
            raise ConfigError("stop_at must be >= 0 (0 = run to max_steps)")
        _choice("engine", self.engine, ["auto", "deepspeed", "torch"])
        if self.eval_batches < 0 or self.eval_every < 0:
            raise ConfigError("eval_every and eval_batches must be >= 0 (eval_every=0 disables validation; "
                              "eval_batches=0 scores the whole valid split)")
        if self.data.document_mask and self.model.attention.method == "fft":
            raise ConfigError("data.document_mask=true needs an attention method that keeps documents apart; the FFT "
                              "runs over the whole window: set model.attention.method=auto (or band / dense)")
        if not 0 <= self.eval_stride <= self.data.seq_len:
            raise ConfigError(f"eval_stride={self.eval_stride} must be in [0, data.seq_len={self.data.seq_len}] "
                              f"(0 = data.seq_len)")

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel replicas on ``world_size`` ranks: ``world_size / deepspeed.sequence_parallel_size``; a
        one-line ConfigError when the sequence-parallel size does not fit the world. Checked as soon as the world
        size is known (:func:`lm.training.distributed.init_distributed`), before the model is built."""
        sp = self.deepspeed.sequence_parallel_size
        if sp > world_size:
            raise ConfigError(f"deepspeed.sequence_parallel_size={sp} is larger than the {world_size} rank(s) of this "
                              f"run; start at least {sp} ranks (NGPU={sp} ./launch.sh ...) or lower it")
        if world_size % sp:
            raise ConfigError(f"deepspeed.sequence_parallel_size={sp} must divide the number of ranks ({world_size}); "
                              f"use NGPU=<a multiple of {sp}> or a sequence_parallel_size that divides {world_size}")
        return world_size // sp

    def gradient_accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step on ``world_size`` ranks (of which ``world_size /
        deepspeed.sequence_parallel_size`` hold different sequences); a ConfigError when the global batch does not
        split evenly. The one place this rule is checked (the engines and :func:`lm.data.shard` ask here)."""
        dp, sp = self.data_parallel_size(world_size), self.deepspeed.sequence_parallel_size
        if sp > 1 and self.batch_size % (self.micro_batch_size * dp):
            raise ConfigError(f"batch_size={self.batch_size} must be a multiple of micro_batch_size x data-parallel "
                              f"ranks = {self.micro_batch_size} x {dp} ({world_size} ranks / "
                              f"deepspeed.sequence_parallel_size={sp}); change batch_size or micro_batch_size")
        return accumulation_steps(self.batch_size, self.micro_batch_size, dp)


def accumulation_steps(batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """``batch_size / (micro_batch_size * world_size)``; a ConfigError naming the keys when it is not whole."""
    per_step = micro_batch_size * world_size
    if batch_size % per_step:
        raise ConfigError(f"batch_size={batch_size} must be a multiple of micro_batch_size x ranks = "
                          f"{micro_batch_size} x {world_size}; change batch_size or micro_batch_size")
    return batch_size // per_step


MOVED_KEYS = {
    "deepspeed.precision": "compute.precision",
    "deepspeed.activation_checkpointing": "compute.activation_checkpointing",
    "max_nonfinite_steps": "divergence.max_bad_steps",
}
"""Keys that moved (old -> new). Given by a user (YAML file or override) an old key is an error that names the new
one; in a config stored by an older version (a checkpoint's meta.json or config.yaml) it is moved silently."""

_WHY_MOVED = {
    "deepspeed.precision": "it applies to both engines, not only DeepSpeed",
    "deepspeed.activation_checkpointing": "it applies to both engines, not only DeepSpeed",
    "max_nonfinite_steps": "loss spikes count as bad steps too",
}


def _dotted_keys(tree, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return []
    out = []
    for k, v in tree.items():
        out.append(f"{prefix}{k}")
        out += _dotted_keys(v, f"{prefix}{k}.")
    return out


def _refuse_moved(keys: Sequence[str], where: str = "", value_of=None) -> None:
    moved = []
    for key in keys:
        if key in MOVED_KEYS:
            new = MOVED_KEYS[key]
            hint = f"{new}={value_of(key)}" if value_of else new
            moved.append(f"{key} was renamed {new} ({_WHY_MOVED[key]}): use {hint}")
    if moved:
        raise ConfigError(where + "; ".join(moved))


def migrate_stored(d: dict) -> dict:
    """A config dict stored by an older version, in today's layout (a copy; keys of :data:`MOVED_KEYS` moved)."""
    d = copy.deepcopy(d)
    for old, new in MOVED_KEYS.items():
        *old_path, old_leaf = old.split(".")
        *new_path, new_leaf = new.split(".")
        parent = d
        for k in old_path:
            parent = parent.get(k) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or old_leaf not in parent:
            continue
        value = parent.pop(old_leaf)
        target = d
        for k in new_path:
            target = target.setdefault(k, {})
        target.setdefault(new_leaf, value)
    return d


def _finish(merged, overrides: Sequence[str]) -> TrainConfig:
    """Apply dotlist overrides, convert to dataclasses (running validation), and map OmegaConf errors."""
    try:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        given = dict(o.split("=", 1) for o in overrides)
        _refuse_moved(list(given), value_of=given.get)
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"bad config key {key!r}: {msg}" if key else f"bad config: {msg}") from None


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> TrainConfig:
    """Merge YAML ``files`` (in order) and ``key=value`` ``overrides`` onto the defaults; validate.

    Raises :class:`ConfigError` naming the key for unknown keys, wrong types and invalid values.
    """
    merged = OmegaConf.structured(TrainConfig)
    for f in files:
        path = Path(f)
        _check_config_file(path)
        loaded = _load_yaml_mapping(path)
        try:
            _refuse_moved(_dotted_keys(OmegaConf.to_container(loaded)), where=f"{path}: ")
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None)
            raise ConfigError(f"{path}: bad config key {key!r}: {str(e).splitlines()[0]}") from None
    return _finish(merged, overrides)


def _check_config_file(path: Path) -> None:
    if path.is_dir():
        example = path / "config.yaml" if (path / "config.yaml").is_file() else "configs/smoke.yaml"
        raise ConfigError(f"config file {str(path)!r} is a directory; give a YAML file, e.g. {str(example)!r}")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")


def _load_yaml_mapping(path: Path) -> DictConfig:
    """The YAML file at ``path`` as a DictConfig; a one-line ConfigError for a syntax error (with its line and
    column), an unreadable file, or a top level that is not a mapping of keys."""
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}; fix the file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file ({e})") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (e.g. 'optim:' then '  lr: 3e-4'), "
                          f"not a {type(OmegaConf.to_container(loaded)).__name__}")
    return loaded


def config_from_dict(d: dict, overrides: Sequence[str] = ()) -> TrainConfig:
    """Rebuild a validated config from a stored plain dict (e.g. a checkpoint's, written by this or an older
    version: see :func:`migrate_stored`), plus ``key=value`` overrides given by the user."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.create(migrate_stored(d)))
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad config key {getattr(e, 'full_key', None)!r}: {str(e).splitlines()[0]}") from None
    return _finish(merged, overrides)


def load_stored_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """The ``config.yaml`` a run or checkpoint directory holds (written by this or an older version), validated,
    plus ``key=value`` overrides. (A YAML file given as a training config goes through :func:`load_config`.)"""
    path = Path(path)
    _check_config_file(path)
    return config_from_dict(OmegaConf.to_container(_load_yaml_mapping(path)), overrides)


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (what every run directory and checkpoint stores)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def as_dict(cfg: TrainConfig) -> dict:
    """The config as plain Python containers (for checkpoints)."""
    return dataclasses.asdict(cfg)
