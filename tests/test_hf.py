"""Export to Hugging Face transformers (lm.hf, tools/export_hf.py) on tiny models of every attention kind: a fresh
process loads the directory with AutoModelForCausalLM / AutoTokenizer; its tokenizer gives our ids, its logits
our model's, its greedy generate() our generate's for 200 tokens past the training context; left-padded batches give
each row what it gets alone; sampling honours temperature, top-k and top-p; the generation cache is ours; and
lm-evaluation-harness's stock `hf` backend agrees with our `lm-kernelized` adapter."""
import ast
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_close, copy_run, smoke_argv

pytest.importorskip("transformers")

import lm.hf  # noqa: E402, F401  (registers the classes with the Auto factories)
from lm.cli.export_hf import main as export_main  # noqa: E402
from lm.cli.train import main as train_main  # noqa: E402
from lm.hf import KernelizedCache, KernelizedLMForCausalLM  # noqa: E402
from lm.hf.remote_code import (RemoteCodeError, check_required_imports, closure, file_name, lm_imports,  # noqa: E402
                               module_file, remote_sources, required_imports)
from lm.inference.generation import Sampling, filter_logits, generate  # noqa: E402
from lm.inference.loading import load_for_inference  # noqa: E402

KINDS = {
    "rpe-general": ["model.attention.rpe_max_distance=1024"],
    "rpe-clipped": ["model.attention.rpe_max_distance=12"],
    "rpe-bucketed": ["model.attention.rpe=bucketed", "model.attention.rpe_num_buckets=8",
                     "model.attention.rpe_max_distance=48"],
    "kernelized-absolute": ["model.attention.kind=kernelized", "model.attention.rpe=none"],
    "softmax-rpe": ["model.attention.kind=softmax", "model.attention.rpe_max_distance=64"],
}
TRAIN_CONTEXT = 128  # configs/smoke.yaml's data.seq_len
NEW_TOKENS = 200
PROMPTS = ["what is kelo ? 37 . the red fox sees a small bird . what is kelo ?", "the", "a small bird sees"]


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """kind -> (run directory, exported directory): smoke models trained 8 steps (the suite's tokenizer)."""
    cache, root = trained_run.parent / "cache", tmp_path_factory.mktemp("hf")
    out = {}
    for name, overrides in KINDS.items():
        run = root / name / "run"
        assert train_main(smoke_argv(run, cache, "max_steps=8", "save_every=8", "log_every=8", *overrides)) == 0
        assert export_main([str(run), str(root / name / "hf")]) == 0
        out[name] = run, root / name / "hf"
    return out


FRESH = r"""
import importlib.util, json, sys
sys.modules["triton"] = None  # as where Triton is not installed: an import of it raises ImportError
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
lm_found = importlib.util.find_spec("lm") is not None
directory, prompts, new_tokens, tensors = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
ids = [tok(p)["input_ids"] for p in prompts]
first = torch.tensor([ids[0]])
with torch.no_grad():
    logits = model(first).logits
greedy = model.generate(first, attention_mask=torch.ones_like(first), max_new_tokens=new_tokens, do_sample=False,
                        min_new_tokens=new_tokens)
model64 = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float64).eval()
batch = tok(prompts, return_tensors="pt", padding=True)
together = model64.generate(**batch, max_new_tokens=40, min_new_tokens=40, do_sample=False)
alone = [model64.generate(torch.tensor([i]), max_new_tokens=40, min_new_tokens=40, do_sample=False)[0].tolist()
         for i in ids]
torch.save({"logits": logits}, tensors)
print("RESULT " + json.dumps({
    "model_class": type(model).__module__ + "." + type(model).__name__, "ids": ids, "lm_found": lm_found,
    "lm_modules": sorted(m for m in sys.modules if m == "lm" or m.startswith("lm.")),
    "decoded": [tok.decode(i, skip_special_tokens=True) for i in ids],
    "greedy": greedy[0, len(ids[0]):].tolist(), "padding_side": tok.padding_side,
    "together": [row[batch["input_ids"].shape[1]:] for row in together.tolist()],
    "alone": [row[len(i):] for row, i in zip(alone, ids)]}))
"""


def fresh_process(python: tuple[str, dict], directory: Path | str, cwd: Path) -> tuple[dict, dict, str]:
    """Run :data:`FRESH` on the export ``directory`` with ``python`` (an interpreter and its environment) in
    ``cwd``: (its results, its tensors, its stderr)."""
    tensors = cwd / "tensors.pt"
    executable, env = python
    done = subprocess.run([executable, "-c", FRESH, str(directory), json.dumps(PROMPTS), str(NEW_TOKENS),
                           str(tensors)], capture_output=True, text=True, cwd=cwd, env=env, stdin=subprocess.DEVNULL)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):]), torch.load(tensors), done.stderr


# Where the user stands: an unrelated folder, or the folder above a clone of the repository named ``lm`` with the
# export inside the clone (``lm/hf/NAME``): there ``import lm`` finds the clone's folder as a namespace package.
LAYOUTS = {"rpe-general": "elsewhere", "rpe-clipped": "above-a-clone", "rpe-bucketed": "elsewhere",
           "kernelized-absolute": "elsewhere", "softmax-rpe": "elsewhere"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_an_environment_without_lm_loads_the_export_and_matches_our_model(kind, exported, python_without_lm,
                                                                          tmp_path):
    run, directory = exported[kind]
    if LAYOUTS[kind] == "above-a-clone":
        clone = tmp_path / "lm"
        clone.mkdir()
        (clone / "lm").symlink_to(REPO / "lm", target_is_directory=True)
        shutil.copytree(directory, clone / "hf" / "smoke")
        got, tensors, stderr = fresh_process(python_without_lm, "lm/hf/smoke", tmp_path)
        assert got["lm_found"]  # the trap is there: `lm` is the clone's folder
    else:
        got, tensors, stderr = fresh_process(python_without_lm, directory, tmp_path)
        assert not got["lm_found"]
    assert got["lm_modules"] == []  # the export's code imports nothing named lm
    assert got["model_class"].startswith("transformers_modules.")
    assert got["model_class"].endswith(".modeling_lm_kernelized.KernelizedLMForCausalLM")
    assert "pip install" not in stderr and "Do you wish to run the custom code" not in stderr, stderr[-2000:]
    ours = load_for_inference(run)
    tok = ours.tokenizer
    assert got["ids"] == [[tok.bos_id, *tok.encode(p)] for p in PROMPTS]  # BOS first, as our tools put it
    assert got["decoded"] == PROMPTS
    with torch.no_grad():
        want = ours.model(torch.tensor([got["ids"][0]]))
    assert_close(tensors["logits"], want, rtol=1e-5, what="logits")
    # greedy decoding, token for token, to 100+ tokens past the training context
    prompt = tok.encode(PROMPTS[0])
    assert len(prompt) + 1 + NEW_TOKENS >= TRAIN_CONTEXT + 100
    mine = list(generate(ours.model, prompt, NEW_TOKENS, Sampling(temperature=0.0), tok.bos_id))
    assert got["greedy"] == mine
    # a left-padded batch: every row continues as it does alone
    assert got["padding_side"] == "left"
    assert got["together"] == got["alone"]


def test_export_directory_holds_what_transformers_and_a_reader_need(exported):
    _, directory = exported["rpe-clipped"]
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "configuration_lm_kernelized.py", "modeling_lm_kernelized.py", "README.md",
            "lm_training_config.yaml"} <= names
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "lm_kernelized" and config["n_positions"] == TRAIN_CONTEXT
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_lm_kernelized.KernelizedLMForCausalLM"
    assert config["lm_model"]["attention"]["rpe_max_distance"] == 12
    assert not any(name.startswith(".") for name in names)  # no temporary debris
    modes = {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()}
    assert set(modes.values()) == {modes["config.json"]}, modes  # the weights too, not 0600
    # the remote code: this package's model code, copied, importing nothing named lm
    sources, modules = remote_sources(), closure()
    assert set(sources) <= names
    for name, want in sources.items():
        code = (directory / name).read_text()
        assert code == want
        assert not re.search(r"^\s*(from|import)\s+lm\b", code, re.MULTILINE), name
        assert '"lm::' not in code and "torch.ops.lm." not in code, name  # the op's namespace is the copy's own
    # each file is its module's source, with only the import lines and the op's namespace changed
    namespace = re.search(r'"(lm_kernelized_[0-9a-f]+)::', (directory / "lm_kernelized_ops_kernelized.py").read_text())
    for module in modules:
        code = (directory / f"{file_name(module)}.py").read_text().split("\n", 2)[2]  # after the two-line header
        for other in modules:
            code = code.replace(f"from .{file_name(other)} import", f"from {other} import")
        code = code.replace(f'"{namespace[1]}::', '"lm::').replace(f"torch.ops.{namespace[1]}.", "torch.ops.lm.")
        assert code == module_file(module).read_text(), module


def test_the_remote_code_is_the_model_code_and_needs_only_torch_and_transformers():
    modules = closure()
    assert {"lm.hf.modeling", "lm.hf.configuration", "lm.model.transformer", "lm.model.attention", "lm.model.cache",
            "lm.ops.kernelized", "lm.ops.recurrent", "lm.ops.fft", "lm.config.model"} <= set(modules)
    assert not [m for m in modules if m.startswith(("lm.training", "lm.data", "lm.cli", "lm.eval", "lm.inference"))
                or m in ("lm.config", "lm.tokenizer", "lm.checkpoint", "lm.hf.export", "lm.hf.tokenizer")]
    for name, code in remote_sources().items():
        assert required_imports(code) <= {"torch", "transformers"} | set(sys.stdlib_module_names), name
        every = {n.split(".")[0] for node in ast.walk(ast.parse(code)) if isinstance(node, (ast.Import, ast.ImportFrom))
                 for n in ([a.name for a in node.names] if isinstance(node, ast.Import) else
                           [node.module or ""] if not node.level else [])}  # guarded ones too
        assert not every & {"deepspeed", "omegaconf", "yaml", "sentencepiece", "lm", "numpy", "datasets"}, name


def test_a_module_the_copy_cannot_carry_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.py"
    for line, advice in (("import lm.ops.fft", "from lm.ops.fft import NAME"),
                         ("from lm.ops import fft", "from lm.ops.fft import NAME"),
                         ("from .fft import fft_forward", "from lm.PACKAGE.MODULE import NAME")):
        bad.write_text(f"def f():\n    {line}\n")
        with pytest.raises(RemoteCodeError, match=re.escape(advice)):
            lm_imports(bad)
    with pytest.raises(RemoteCodeError, match="would require deepspeed"):
        check_required_imports("x.py", "import torch\nimport deepspeed\n")
    check_required_imports("x.py", "try:\n    import triton\nexcept ImportError:\n    triton = None\n")


def test_importing_lm_hf_registers_the_auto_classes_without_remote_code(exported, tmp_path):
    _, directory = exported["softmax-rpe"]
    script = ("import sys, lm.hf; from transformers import AutoConfig, AutoModelForCausalLM; "
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); c = AutoConfig.from_pretrained(sys.argv[1]); "
              "print('RESULT', type(m).__module__, type(c).__name__)")
    done = subprocess.run([sys.executable, "-c", script, str(directory)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RESULT lm.hf.modeling KernelizedLMConfig" in done.stdout


@pytest.fixture(scope="module")
def clipped_model(exported):
    _, directory = exported["rpe-clipped"]
    return KernelizedLMForCausalLM.from_pretrained(str(directory)).eval()


def test_sampling_honours_temperature_top_k_and_top_p(clipped_model):
    model = clipped_model
    ids = torch.tensor([[1, *range(5, 25)]])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    greedy = model.generate(ids, max_new_tokens=6, do_sample=False)
    for settings in (dict(top_k=1), dict(top_p=1e-9), dict(temperature=1e-4, top_k=0)):
        torch.manual_seed(0)
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=True, **settings), greedy), settings
    n = 300
    for settings, temperature in ((dict(top_k=3, temperature=0.7), 0.7), (dict(top_p=0.3, top_k=0, temperature=1.5),
                                                                          1.5)):
        torch.manual_seed(1)
        first = model.generate(ids, max_new_tokens=1, do_sample=True, num_return_sequences=n, **settings)[:, -1]
        allowed = torch.isfinite(filter_logits(logits[None] / temperature, settings.get("top_k", 0),
                                               settings.get("top_p", 1.0)))[0]
        assert allowed[first].all(), settings  # never a token outside the top-k / nucleus
        assert len(set(first.tolist())) > 1  # and it does sample among them
    torch.manual_seed(2)
    hot = model.generate(ids, max_new_tokens=12, do_sample=True, temperature=3.0, top_k=0)
    assert not torch.equal(hot, model.generate(ids, max_new_tokens=12, do_sample=False))


@pytest.mark.parametrize("kind, constant", [("rpe-clipped", True), ("rpe-general", False), ("softmax-rpe", False)])
def test_the_generation_cache_is_ours_and_constant_for_clipped_rpe(kind, constant, exported):
    _, directory = exported[kind]
    model = KernelizedLMForCausalLM.from_pretrained(str(directory)).eval()
    sizes = []
    for n in (20, 400):
        ids = torch.randint(3, 300, (1, n), generator=torch.Generator().manual_seed(n))
        out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        assert isinstance(out.cache, KernelizedCache) and out.cache.get_seq_length() == n + 2
        sizes.append(out.cache.nbytes())
    assert (sizes[0] == sizes[1]) == constant, sizes


def test_beam_search_runs_on_our_cache(clipped_model):
    ids = torch.tensor([[1, 7, 9, 11]])
    out = clipped_model.generate(ids, max_new_tokens=5, num_beams=3, do_sample=False, num_return_sequences=2)
    assert out.shape == (2, 9) and torch.equal(out[:, :4], ids.expand(2, -1))


def test_bfloat16_export_loads_in_bfloat16_and_stays_close(exported, tmp_path, capsys):
    run, directory = exported["rpe-clipped"]
    assert export_main([str(run), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert "bfloat16" in capsys.readouterr().out
    model = KernelizedLMForCausalLM.from_pretrained(str(tmp_path / "bf16"))
    assert model.model.tok_emb.weight.dtype == torch.bfloat16
    ids = torch.tensor([[1, *range(5, 40)]])
    with torch.no_grad():
        low = model(ids).logits
        high = KernelizedLMForCausalLM.from_pretrained(str(directory))(ids).logits
    assert low.dtype == torch.float32
    assert_close(low, high, rtol=0.05, what="bf16 logits")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_export_errors_are_one_line_and_nothing_is_overwritten(exported, tmp_path, capsys):
    run, _ = exported["rpe-clipped"]
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    assert export_main([str(run), str(target)]) == 2
    assert "not empty" in one_line_error(capsys) and (target / "keep.txt").read_text() == "mine"
    assert export_main([str(run), str(target), "--force"]) == 2  # --force replaces only an earlier export
    assert "not an export" in one_line_error(capsys) and os.listdir(target) == ["keep.txt"]
    (target / "keep.txt").unlink()
    assert export_main([str(run), str(target)]) == 0 and (target / "model.safetensors").is_file()
    assert export_main([str(run), str(target), "--force"]) == 0 and (target / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary debris left beside it
    capsys.readouterr()
    assert export_main([str(tmp_path / "nope"), str(tmp_path / "x")]) == 2
    assert "does not exist" in one_line_error(capsys) and not (tmp_path / "x").exists()
    damaged = copy_run(run, tmp_path / "damaged")
    newest = sorted((damaged / "checkpoints").iterdir())[-1]
    (newest / "model.pt").write_bytes(b"not a checkpoint")
    assert export_main([str(newest), str(tmp_path / "y")]) == 2
    assert "damaged" in one_line_error(capsys) and not (tmp_path / "y").exists()


def test_without_transformers_the_tool_says_how_to_install_it(exported, tmp_path):
    run, _ = exported["rpe-clipped"]
    script = ("import sys; sys.modules['transformers'] = None; from lm.cli.export_hf import main; "
              "sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", script, str(run), str(tmp_path / "out")], capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 2 and "pip install -e '.[hf]'" in done.stderr
    assert done.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


# ------------------------------------------------------------------ lm-evaluation-harness's stock hf backend
@pytest.mark.slow
def test_lm_eval_hf_backend_agrees_with_our_adapter(wikitext_run, five_test_articles, tmp_path):
    pytest.importorskip("lm_eval")
    import lm_eval.models  # noqa: F401  (registers the stock backends, hf among them)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lm.data.hub import hub_offline
    from lm.eval.harness import HarnessLM, run_tasks
    from lm.eval.harness_tasks import write_tasks

    directory = tmp_path / "hf"
    assert export_main([str(wikitext_run), str(directory)]) == 0
    rolling, choice = write_tasks(five_test_articles / "wiki.test.tokens", tmp_path / "tasks", prefix="sample",
                                  num_questions=20)
    ours = run_tasks(HarnessLM(wikitext_run, batch_size=8, device="cpu"), [rolling, choice],
                     include_path=[tmp_path / "tasks"])["results"]
    with hub_offline(True):
        theirs = simple_evaluate(model="hf", model_args=f"pretrained={directory},trust_remote_code=True",
                                 tasks=[rolling, choice], batch_size=8, device="cpu", bootstrap_iters=0,
                                 task_manager=TaskManager(include_path=[str(tmp_path / "tasks")],
                                                          include_defaults=False))["results"]
    ppl_ours, ppl_theirs = ours[rolling]["word_perplexity,none"], theirs[rolling]["word_perplexity,none"]
    assert math.isfinite(ppl_ours) and abs(ppl_theirs / ppl_ours - 1) <= 0.005, (ppl_ours, ppl_theirs)
    assert theirs[choice]["acc,none"] == ours[choice]["acc,none"]


# ------------------------------------------------------------------ values, against independent computations
IN_PROCESS_KINDS = {
    "rpe-clipped": dict(rpe_max_distance=6),
    "rpe-general": dict(rpe_max_distance=256),
    "kernelized-absolute": dict(kind="kernelized", rpe="none"),
    "softmax-rpe": dict(kind="softmax", rpe_max_distance=16),
}
"""Attention kinds of the in-process models: clipped RPE (the ring is shorter than the prompts), general RPE,
absolute positions, softmax attention with a KV cache."""


def hf_model(kind: str, dtype: torch.dtype = torch.float64) -> KernelizedLMForCausalLM:
    """A tiny untrained ``KernelizedLMForCausalLM`` of ``kind`` with far-from-flat RPE and O(1) logits (as if
    trained; no training, no files), in ``dtype`` (float64: cached and uncached decoding agree to round-off, so
    no argmax can flip between them)."""
    from conftest import tiny_model, tiny_model_config
    from lm.hf import KernelizedLMConfig

    cfg = tiny_model_config(vocab_size=64, **IN_PROCESS_KINDS[kind])
    config = KernelizedLMConfig.from_model_config(cfg, 32, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = KernelizedLMForCausalLM(config)
    model.model.load_state_dict(tiny_model(3, config=cfg, looks_trained=True).state_dict())
    return model.to(dtype).eval()


def padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, of 11 and 7 tokens, left-padded with the pad id (2): (ids, attention_mask)."""
    long, short = [1, 9, 17, 4, 33, 5, 21, 8, 40, 12, 6], [1, 30, 7, 19, 3, 25, 11]
    ids = torch.tensor([long, [2] * 4 + short])
    return ids, (torch.arange(11) >= torch.tensor([[0], [4]])).long()


def test_labels_loss_is_the_mean_cross_entropy_of_each_position_with_the_next_token():
    """``model(ids, labels=ids).loss``, the recipe of Hugging Face's perplexity and fine-tuning scripts: the mean
    over positions t of -log p(label[t + 1] | ids[: t + 1]), labels of -100 left out."""
    model = hf_model("rpe-clipped", torch.float32)
    ids = torch.randint(3, 64, (2, 13), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, 4] = labels[1, :3] = -100
    with torch.no_grad():
        out = model(ids, labels=labels, use_cache=False)
        plain = model(ids, labels=ids, use_cache=False).loss
    logp = torch.log_softmax(out.logits.double(), dim=-1)
    terms = [-logp[b, t, labels[b, t + 1]] for b in range(2) for t in range(12) if labels[b, t + 1] != -100]
    assert len(terms) == 2 * 12 - 3
    assert out.loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    every = [-logp[b, t, ids[b, t + 1]] for b in range(2) for t in range(12)]
    assert plain.item() == pytest.approx(torch.stack(every).mean().item(), rel=1e-5)


@pytest.mark.parametrize("kind", list(IN_PROCESS_KINDS))
def test_generate_with_our_cache_equals_generate_without_a_cache(kind):
    """Greedy decoding of a left-padded batch: with our cache (prefill, then one token at a time) and without one
    (a full forward over everything so far at every token), the same tokens and the same logits; and each row
    continues as its prompt does alone."""
    model = hf_model(kind)
    ids, mask = padded_prompts()
    runs = {use: model.generate(ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                use_cache=use, return_dict_in_generate=True, output_logits=True)
            for use in (True, False)}
    assert isinstance(runs[True].cache, KernelizedCache) and runs[True].cache.get_seq_length() == 11 + 11
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    assert_close(torch.stack(runs[True].logits), torch.stack(runs[False].logits), rtol=1e-9, what="logits")
    logits = torch.stack(runs[True].logits, dim=1)  # (2, 12, V)
    for row, real, row_logits in zip(runs[True].sequences, mask.bool(), logits):
        alone = model.generate(row[:11][real][None], max_new_tokens=12, min_new_tokens=12, do_sample=False,
                               return_dict_in_generate=True, output_logits=True)
        assert torch.equal(alone.sequences[0, -12:], row[11:])
        assert_close(row_logits, torch.stack(alone.logits, dim=1)[0], rtol=1e-9, what="logits of the row alone")


def test_beam_search_with_our_cache_equals_beam_search_without_a_cache():
    """Beam search reorders the cache's rows at every token (``reorder_cache``); without a cache every beam is
    recomputed from its tokens. The same beams, the same scores."""
    model = hf_model("rpe-clipped")
    ids, mask = padded_prompts()
    runs = {use: model.generate(ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, num_beams=4,
                                num_return_sequences=4, do_sample=False, use_cache=use,
                                return_dict_in_generate=True, output_scores=True)
            for use in (True, False)}
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    assert len({tuple(s) for s in runs[True].sequences[:4, 11:].tolist()}) == 4  # four distinct beams per prompt
    assert_close(runs[True].sequences_scores, runs[False].sequences_scores, rtol=1e-9, what="beam scores")


def test_the_export_writes_the_runs_ids_settings_tokenizer_and_weights(trained_run, tmp_path):
    """Every id and setting the export writes, read back from the files and compared with the run's own."""
    import safetensors.torch
    from transformers import AutoTokenizer

    from lm.checkpoint import find_checkpoint
    from lm.config import config_from_dict, load_stored_config
    from lm.hf.export import export_checkpoint

    ours = load_for_inference(trained_run)
    tok, cfg = ours.tokenizer, ours.cfg
    directory = export_checkpoint(trained_run, tmp_path / "hf").directory

    config = json.loads((directory / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (tok.bos_id, tok.eos_id,
                                                                                      tok.eos_id)
    assert config["model_type"] == "lm_kernelized" and config["n_positions"] == cfg.data.seq_len
    assert config_from_dict({"model": config["lm_model"]}).model == cfg.model
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"],
            config["num_attention_heads"]) == (cfg.model.vocab_size, cfg.model.d_model, cfg.model.n_layers,
                                               cfg.model.n_heads)
    assert config["tie_word_embeddings"] is True and config["use_cache"] is True and config["dtype"] == "float32"
    generation = json.loads((directory / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (
        tok.bos_id, tok.eos_id, tok.eos_id)

    fast = AutoTokenizer.from_pretrained(str(directory))
    assert (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id, fast.unk_token_id) == (
        tok.bos_id, tok.eos_id, tok.eos_id, tok.unk_id)
    assert [fast.bos_token, fast.eos_token, fast.unk_token] == [tok.id_to_piece(i) for i in (tok.bos_id, tok.eos_id,
                                                                                            tok.unk_id)]
    assert len(fast) == tok.vocab_size and fast.padding_side == "left"
    text = "what is kelo ? 37 .\nthe red fox sees a small bird ."
    assert fast(text)["input_ids"] == [tok.bos_id, *tok.encode(text)]
    assert fast.decode(fast(text)["input_ids"], skip_special_tokens=True) == text

    assert load_stored_config(directory / "lm_training_config.yaml") == cfg
    weights = safetensors.torch.load_file(str(directory / "model.safetensors"))
    stored = torch.load(find_checkpoint(trained_run) / "model.pt", weights_only=True)
    assert sorted(weights) == sorted(f"model.{k}" for k in stored)
    assert all(torch.equal(weights[f"model.{k}"], v) for k, v in stored.items())
    assert f"for {ours.step} steps" in (directory / "README.md").read_text()
