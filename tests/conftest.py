"""Shared test scaffolding: paths, tiny model and config builders, a smoke-training command, `assert_close`, and
the attention op's helpers (inputs, bias families, error measures, a dispatch mode that counts, and on ``meta``
executes, the kernels inside the op's custom ops).

Test files import the helpers from here (``from conftest import tiny_model``); fixtures are found by pytest.
"""
from __future__ import annotations

import collections
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lm.config import AttentionConfig, ModelConfig, TrainConfig, load_config
from lm.training.distributed import DistInfo
from lm.model import Transformer

if not torch.cuda.is_available():
    # The fused method's Triton kernels run on CPU tensors through Triton's interpreter (read when triton loads).
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = REPO / "configs" / "smoke.yaml"
SAMPLE_DIR = Path(os.environ.get("LM_WIKITEXT_SAMPLE", REPO.parent / "shared" / "data" / "wikitext-103-sample"))
"""Real WikiText-103 files (train: a prefix; valid and test complete): the folder ``LM_WIKITEXT_SAMPLE`` names, by
default ``../shared/data/wikitext-103-sample`` next to the repository."""


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """:data:`SAMPLE_DIR`; the test is skipped when it is not there."""
    if not SAMPLE_DIR.is_dir():
        pytest.skip(f"{SAMPLE_DIR} not present (set LM_WIKITEXT_SAMPLE to a folder of wiki.*.tokens files)")
    return SAMPLE_DIR


# ---------------------------------------------------------------------------------------------- tiny models
def tiny_model_config(vocab_size: int = 50, n_layers: int = 2, d_model: int = 32, n_heads: int = 4, d_ff: int = 64,
                      dropout: float = 0.0, **attention) -> ModelConfig:
    """A model config small enough for exhaustive CPU tests; ``attention`` are AttentionConfig fields
    (``num_features`` defaults to 16)."""
    attention.setdefault("num_features", 16)
    return ModelConfig(vocab_size=vocab_size, n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_ff=d_ff,
                       dropout=dropout, attention=AttentionConfig(**attention))


def tiny_model(seed: int = 0, *, config: ModelConfig | None = None, init_weights: bool = True,
               looks_trained: bool = False, **config_fields) -> Transformer:
    """A tiny Transformer in eval mode, every random draw fixed by ``seed``.

    Args:
        config: the model config; default ``tiny_model_config(**config_fields)``.
        init_weights: the GPT-2 initialisation (:meth:`Transformer.init_weights`); False keeps PyTorch's default.
        looks_trained: then redraw the RPE biases from N(0, 1) and the token embeddings from N(0, 0.5), so that
            the RPE is far from flat and the logits are O(1), as in a trained model.
    """
    torch.manual_seed(seed)
    model = Transformer(config if config is not None else tiny_model_config(**config_fields))
    if init_weights:
        model.init_weights()
    if looks_trained:
        with torch.no_grad():
            for p in model.rpe.parameters():
                p.normal_(0.0, 1.0)
            model.tok_emb.weight.normal_(0.0, 0.5)
    return model.eval()


def trained_looking_model(seed: int = 0, **config_fields) -> Transformer:
    """``tiny_model(seed, looks_trained=True, **config_fields)``: far-from-flat RPE, O(1) logits."""
    return tiny_model(seed, looks_trained=True, **config_fields)


def tiny_train_config(*overrides: str) -> TrainConfig:
    """A full training config around a 2-layer, 32-wide model on 12-token windows, batch 8 (micro-batches of 2)."""
    return load_config([], ["model.vocab_size=50", "model.n_layers=2", "model.d_model=32", "model.n_heads=2",
                            "model.d_ff=64", "model.dropout=0.0", "model.attention.num_features=8",
                            "model.attention.rpe_max_distance=16", "data.source=synthetic", "data.seq_len=12",
                            "batch_size=8", "micro_batch_size=2", "optim.warmup_steps=0", *overrides])


def cpu_info(rank: int = 0, world: int = 1) -> DistInfo:
    """Where a plain-torch engine runs in a CPU test."""
    return DistInfo("torch", rank, world, rank, torch.device("cpu"))


def smoke_argv(run_dir: Path, cache_dir: Path, *overrides: str) -> list[str]:
    """Arguments of ``lm.cli.train.main`` (= ``tools/train.py``) for a short smoke run: configs/smoke.yaml on a
    small synthetic corpus, a loss line every step, no validation; later ``overrides`` win."""
    return [str(SMOKE_CONFIG), f"run_dir={run_dir}", f"data.cache_dir={cache_dir}", "data.progress=false",
            "data.synthetic.train_tokens=60000", "log_every=1", "eval_every=0", *overrides]


TRAINED_RUN_STEPS = 6
"""Length of :func:`trained_run`: checkpoints at steps 2, 4 and 6, full validation at 6."""


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """The suite's one small trained run: ``lm.cli.train.main(smoke_argv(...))`` for 6 steps, checkpoints at 2, 4
    and 6 (all kept), a loss line every 3 steps, validation over the whole valid split at step 6. Its data cache
    is ``trained_run.parent / "cache"`` (resume a copy with ``smoke_argv(copy, that cache, ...)``). Tests only read
    it, or write evaluation reports into its ``eval/``; a test that changes it works on a copy (``copy_run``)."""
    from lm.checkpoint import checkpoint_step, list_checkpoints
    from lm.cli.train import main

    root = tmp_path_factory.mktemp("trained")
    run = root / "run"
    assert main(smoke_argv(run, root / "cache", f"max_steps={TRAINED_RUN_STEPS}", "save_every=2",
                           "keep_checkpoints=3", f"eval_every={TRAINED_RUN_STEPS}", "eval_batches=0",
                           "log_every=3")) == 0
    assert [checkpoint_step(c) for c in list_checkpoints(run)] == [2, 4, 6]
    return run


def train_run(root: Path, *overrides: str) -> Path:
    """Train ``smoke_argv(root / "run", root / "cache", ...)`` with ``overrides`` (e.g. another corpus), one
    checkpoint at the end; returns the run directory."""
    from lm.cli.train import main

    run = root / "run"
    assert main(smoke_argv(run, root / "cache", "save_every=100000", "log_every=100000", *overrides)) == 0
    return run


def copy_run(run: Path, where: Path) -> Path:
    """A copy of the run directory ``run`` at ``where/run`` (to damage or to resume)."""
    copy = where / "run"
    shutil.copytree(run, copy)
    return copy


@pytest.fixture
def run(trained_run, tmp_path) -> Path:
    """A copy of the suite's trained run (checkpoints at steps 2, 4, 6), to damage or to resume."""
    return copy_run(trained_run, tmp_path)


@pytest.fixture
def cache_dir(trained_run) -> Path:
    """The trained run's data cache (its tokenizer is trained once for every test that resumes a copy)."""
    return trained_run.parent / "cache"


def ckpt(run: Path, step: int) -> Path:
    """Checkpoint ``step`` of the run directory ``run``."""
    from lm import checkpoint
    return run / "checkpoints" / checkpoint.checkpoint_name(step)


def write_meta(checkpoint_dir: Path, meta: dict, older_version: bool = False) -> None:
    """Rewrite a checkpoint's meta.json as ``meta`` and record its hash beside it, as the trainer does (a test that
    means to change a checkpoint's metadata, not to damage it); ``older_version``: as a version before meta.json
    had a hash of its own wrote it (no hash file)."""
    import json

    from lm.checkpoint import META, META_HASH, meta_digest
    text = json.dumps(meta).encode()
    (checkpoint_dir / META).write_bytes(text)
    if older_version:
        meta.pop("meta_sha256", None)
        (checkpoint_dir / META).write_bytes(json.dumps(meta).encode())
        (checkpoint_dir / META_HASH).unlink(missing_ok=True)
    else:
        (checkpoint_dir / META_HASH).write_text(meta_digest(text) + "\n")


def launch_env(path_prepend=None, **env) -> dict:
    """The environment of a ``launch.sh`` call from a test: no set-up step (``LM_SKIP_SETUP=1``), this
    interpreter's ``python`` first on PATH, no inherited NGPU / HOSTFILE / MASTER_*; ``env`` on top."""
    e = {k: v for k, v in os.environ.items() if k not in ("NGPU", "HOSTFILE", "MASTER_ADDR", "MASTER_PORT")}
    e.update(LM_SKIP_SETUP="1", **env)
    e["PATH"] = os.pathsep.join([*([str(path_prepend)] if path_prepend else []), str(Path(sys.executable).parent),
                                 e.get("PATH", "")])
    return e


def scalars(run_dir, tag: str) -> dict[int, float]:
    """TensorBoard scalars ``tag`` of a run directory: ``{step: value}`` (float32 values, as logged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


# ---------------------------------------------------------------------------------------------- comparisons
def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str = "") -> None:
    """``got`` equals ``want`` up to ``rtol`` times the largest magnitude of ``want`` (a max-norm relative error:
    the scale-free check for logits and activations, which have no natural per-element tolerance)."""
    assert got.shape == want.shape, f"{what} shape {tuple(got.shape)} != {tuple(want.shape)}"
    scale = want.abs().max().clamp_min(torch.finfo(want.dtype).tiny)
    err = ((got - want).abs().max() / scale).item()
    assert err <= rtol, f"{what} relative error {err:.2e} > {rtol:.1e}"


def loss_and_grads(forward, model, ids):
    """Next-token loss of ``forward(ids[:, :-1])`` and the gradients it leaves on ``model``'s parameters."""
    model.zero_grad(set_to_none=True)
    logits = forward(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def compiled_and_eager(device: torch.device, attention: dict, backend: str):
    """(loss, gradients) of a 2-layer model with ``attention`` under ``torch.compile(fullgraph=True)`` with
    ``backend`` on ``device``, then eager's: a trained-looking decaying RPE, 150 tokens (an FFT far field and three
    band blocks; not a multiple of 64)."""
    torch._dynamo.reset()
    cfg = ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, d_ff=64, dropout=0.0,
                      attention=AttentionConfig(num_features=8, rpe_max_distance=512, **attention))
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    with torch.no_grad():
        for r in model.rpe:
            r.bias.copy_(-0.5 * torch.log1p(torch.arange(r.bias.shape[-1], dtype=torch.float32))
                         + 0.3 * torch.randn_like(r.bias))
    model.to(device).refresh_precision_policy()
    ids = torch.randint(0, 64, (2, 151), generator=torch.Generator().manual_seed(1)).to(device)
    eager = loss_and_grads(model, model, ids)
    compiled = loss_and_grads(torch.compile(model, backend=backend, fullgraph=True), model, ids)
    torch._dynamo.reset()
    return compiled, eager


# ---------------------------------------------------------------------------------------------- op inputs

def op_inputs(B, H, N, M, D, dtype=torch.float64, seed=0):
    """Uniform [0, 1) features ``phi_q``, ``phi_k`` ``(B, H, N, M)`` and Gaussian values ``v`` ``(B, H, N, D)``."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, H, N, M, generator=g, dtype=dtype)
    k = torch.rand(B, H, N, M, generator=g, dtype=dtype)
    v = torch.randn(B, H, N, D, generator=g, dtype=dtype)
    return q, k, v


def bias_of(shape, dtype=torch.float64, scale=1.0, seed=1):
    """Gaussian RPE bias of ``shape`` (None for None)."""
    if shape is None:
        return None
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def worst_relative(out, ref):
    """Worst per-position relative error ``|out_i - ref_i| / |ref_i|`` (norms over D)."""
    return ((out.double() - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()


def bias_kind(kind, span, L, H=2, seed=1):
    """``(H, L)`` float32 biases of a shape whose values span ``span`` nats."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(L, dtype=torch.float64)
    if kind == "random":
        b = (torch.rand(H, L, generator=g, dtype=torch.float64) - 0.5) * span
    elif kind == "rising":  # far offsets weigh most: the hardest case for FFT round-off
        b = (t / max(L - 1, 1) * span).expand(H, L)
    elif kind == "decaying":
        b = (-span * torch.log1p(t) / math.log(L)).expand(H, L)
    elif kind == "spiky":
        b = torch.where(torch.rand(H, L, generator=g) < 0.02, 0.0, -span).double()
        b[:, 0] = 0.0
    elif kind == "clipped":  # short learned band, then one constant for all far offsets
        b = torch.full((H, L), -span, dtype=torch.float64)
        b[:, :32] = torch.linspace(0, -span / 2, 32, dtype=torch.float64)
    else:
        raise ValueError(kind)
    return b.float().contiguous()


def lm_bias(kind, N, H=2, seed=1):
    """``(H, N)`` float32 biases of the families the FFT precision policy is judged on
    (``lm.ops.reference.bias_family``)."""
    from lm.ops.reference import bias_family
    return bias_family(kind, N, H, seed)


# ----------------------------------------------------------------------------- counting inside the custom op

def _custom_op_impls():
    from lm.ops import kernelized
    return {torch.ops.lm.kernelized_mix.default: kernelized._mix_impl,
            torch.ops.lm.kernelized_mix_backward.default: kernelized._mix_backward_impl}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched in its scope (this thread). A custom op is one opaque call to a dispatch
    mode, so for ``lm::`` ops the counter runs their Python implementation under itself instead: its kernels
    are counted, and on ``meta`` tensors they really run (a host read would fail there)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.custom = collections.Counter()
        self.impls = _custom_op_impls()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = self.impls.get(func)
        if impl is not None:
            self.custom[str(func)] += 1
            with self:
                return impl(*args, **kwargs)
        self.ops[str(func)] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.ops.values())


# ---------------------------------------------------------------------------------------------- WikiText runs
@pytest.fixture(scope="session")
def wikitext_run(tmp_path_factory, sample_dir) -> Path:
    """A tiny model trained 30 steps on the WikiText-103 sample (its tokenizer knows English: 512 pieces)."""
    return train_run(tmp_path_factory.mktemp("wikitext"), "max_steps=30", "data.source=local",
                     f"data.path={sample_dir}", "data.tokenizer.vocab_size=512")


@pytest.fixture(scope="session")
def five_test_articles(tmp_path_factory, sample_dir) -> Path:
    """A data directory whose test split is the sample's first 5 test articles (~1/12 of it, to keep tests short);
    train is the sample's (eval_ppl locates every split)."""
    from lm.eval.harness_tasks import wikitext_articles

    d = tmp_path_factory.mktemp("subset")
    docs = wikitext_articles((sample_dir / "wiki.test.tokens").read_text(encoding="utf-8"))
    (d / "wiki.test.tokens").write_text("".join(docs[:5]), encoding="utf-8")
    (d / "wiki.train.tokens").symlink_to(sample_dir / "wiki.train.tokens")
    return d


# ---------------------------------------------------------------------------------------------- CUDA
def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` (run them with ``pytest -m cuda``) are skipped, with the reason "CUDA not available",
    where torch sees no CUDA device, so the suite stays green on machines without a GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="CUDA not available")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def norm_relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative error in norm, ``|got - want| / max(|want|, 1e-3)`` (float64, on the CPU): a gradient that is 0
    in theory (N = 1, the bias when L = 1) is compared absolutely."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return ((got - want).norm() / want.norm().clamp_min(1e-3)).item()


# ---------------------------------------------------------------------------------------------- documents corpora
_DOC_WORDS = ["river", "stone", "lamp", "quiet", "bright", "moves", "under", "over", "the", "a", "of", "and", "42",
              "café", "naïve", "über", "x=1;", "def", "return", "(", ")", "–"]


def sample_documents(num_docs: int, seed: int = 0, max_lines: int = 4) -> list[str]:
    """``num_docs`` distinct small documents of 1 to ``max_lines`` lines of words (some non-ASCII, some code-like;
    about one in three ends with a newline), fixed by ``seed``."""
    import random

    rng = random.Random(seed)
    docs = []
    for k in range(num_docs):
        lines = [" ".join(rng.choices(_DOC_WORDS, k=rng.randint(2, 12))) for _ in range(rng.randint(1, max_lines))]
        docs.append(f"doc {k}: " + "\n".join(lines) + ("\n" if rng.random() < 0.3 else ""))
    return docs


def write_documents(path: Path, docs: list[str], text_field: str = "text", **columns) -> Path:
    """Write ``docs`` in the format ``path``'s name says: one JSON object per line (``.jsonl``, ``.json``, also
    ``.gz`` / ``.zst``), a Parquet table (``.parquet``), or one document as plain text (``.txt``, ``.txt.gz``).
    ``columns`` are extra columns (lists as long as ``docs``)."""
    import gzip
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({text_field: pa.array(docs, pa.string()), **columns}), path, row_group_size=64)
        return path
    if ".txt" in name:
        assert len(docs) == 1, "a .txt file holds one document"
        data = docs[0].encode()
    else:
        rows = [{text_field: d, **{k: v[i] for k, v in columns.items()}} for i, d in enumerate(docs)]
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    if name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    elif name.endswith(".zst"):
        import zstandard
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------- real trainer processes
TRAIN_PY = REPO / "tools" / "train.py"


def train_command(*argv: str) -> list[str]:
    """``python tools/train.py ARGV`` with this interpreter."""
    return [sys.executable, str(TRAIN_PY), *argv]


def same_threads_env(**env) -> dict:
    """This process's environment with ``OMP_NUM_THREADS=1`` (bit equality between runs needs the same
    floating-point reduction order, which depends on the thread count) and ``env`` on top."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **env}


class TrainerProcess:
    """A command (a trainer, ``launch.sh``, ``torchrun``) run as a real process, leader of a process group of its
    own; its output (stdout and stderr together) is read as it comes, so that a test can wait for a line and
    then send a signal. As a context manager it kills whatever of the process tree is still alive at the end."""

    def __init__(self, cmd: list[str], env: dict | None = None):
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 300) -> str:
        """The first output line containing ``text``, once it is there; fails when the process ends first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((line for line in self.lines if text in line), None)
                if found is not None:
                    return found
                assert self._reader.is_alive(), f"ended before printing {text!r}:\n{''.join(self.lines)[-4000:]}"
                assert time.monotonic() < deadline, f"no {text!r} after {timeout} s:\n{''.join(self.lines)[-4000:]}"
                self._changed.wait(0.5)

    def wait_until(self, condition, what: str, timeout: float = 300) -> None:
        """Poll ``condition()`` every 10 ms until it holds; fails when the process ends first."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"ended before {what}:\n{self.output[-4000:]}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{self.output[-4000:]}"
            time.sleep(0.01)

    def send(self, sig: int) -> None:
        """``sig`` to the process itself."""
        os.kill(self.proc.pid, sig)

    def send_group(self, sig: int) -> None:
        """``sig`` to its process group, as a terminal's Ctrl-C does to the command in the foreground."""
        os.killpg(self.proc.pid, sig)

    def finish(self, timeout: float = 600) -> int:
        """Wait for the exit; returns the exit status."""
        status = self.proc.wait(timeout)
        self._reader.join(timeout)
        return status

    def __enter__(self) -> "TrainerProcess":
        return self

    def __exit__(self, *exc) -> None:
        import psutil
        try:
            tree = [*psutil.Process(self.proc.pid).children(recursive=True), psutil.Process(self.proc.pid)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()
        self._reader.join(10)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of the newest checkpoint of ``run_dir``."""
    from lm.checkpoint import find_checkpoint
    return torch.load(find_checkpoint(run_dir) / "model.pt", weights_only=True)


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    """The newest checkpoints of two runs hold bit-identical weights."""
    a, b = final_weights(run_a), final_weights(run_b)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between {run_a} and {run_b}"



# ------------------------------------------------------------------------------------ an environment without lm
@pytest.fixture(scope="session")
def python_without_lm(tmp_path_factory) -> tuple[str, dict]:
    """(interpreter, environment) of a fresh virtual environment that sees this one's installed packages (torch,
    transformers, ...) but not ``lm``: its site-packages holds one ``.pth`` line naming ours, so our editable
    install's own ``.pth`` hook is never run; no PYTHONPATH; transformers' module cache in a folder of its own.
    How a user without this repository loads an exported model."""
    import site
    import sysconfig

    venv = tmp_path_factory.mktemp("venv-without-lm")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if Path(p).is_dir()]
    (Path(purelib) / "shared-packages.pth").write_text("\n".join(ours) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_MODULES_CACHE=str(venv / "hf_modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    probe = subprocess.run([str(python), "-c", "import importlib.util as u; print(u.find_spec('lm'))"],
                           capture_output=True, text=True, env=env, cwd=venv)
    assert probe.stdout.strip() == "None", (probe.stdout, probe.stderr[-2000:])
    return str(python), env
