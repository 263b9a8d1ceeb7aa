"""The GPU path on CUDA (``pytest -m cuda``; tools/gpu_check.sh runs these first): the op against the float64
reference for every method and RPE bias family (values and all four gradients, float32 and bfloat16 inputs) and on
one long sequence; decoding (prefill + decode steps) against the full forward; one DeepSpeed bf16 ZeRO-1 step on one
GPU (NCCL, a world of one) against the plain-torch engine; a checkpoint trained on CUDA and loaded on the CPU; the
model under ``torch.compile(fullgraph=True)`` against eager for every attention kind and method (last: the
slowest).

Where CUDA is absent the ``cuda`` tests are skipped ("CUDA not available", tests/conftest.py). Each check is a
function of the device, and the unmarked tests at the end run some of them on the CPU, so that the code of this file
runs in every CI run; on a GPU only the device differs. Every reference (float64, the plain-torch engine, the CPU
model) is computed from the same values as the tested run; TF32 is off in every test (fp32 matmuls stay fp32).

bfloat16 tolerances: the op upcasts bf16 inputs to float32, computes exactly as for float32 inputs and rounds its
output, and each gradient (through the cast back to the input's dtype), to bf16 once. The reference takes the same
bf16-rounded inputs and output gradient in float64, so the one extra error is that rounding: at most bf16's unit
roundoff 2^-8 relative per element, hence per row and in norm. So a bf16 bound is the float32 bound (1e-4 per
position for values, 1e-3 in norm for gradients, as tests/test_ops_values.py and test_ops_grads.py hold on the CPU)
plus 2^-8 (1 + that bound).
"""
import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import (assert_close, compiled_and_eager, norm_relative, op_inputs, train_run, trained_looking_model,
                      worst_relative)
from lm.checkpoint import WEIGHTS, find_checkpoint
from lm.inference.decoding import decode_step, prefill
from lm.inference.loading import load_for_inference
from lm.ops import kernelized_attention
from lm.ops.reference import (BIAS_FAMILIES, bias_family, kernelized_attention_reference,
                              kernelized_attention_reference_rows)
from lm.training.distributed import free_port
from test_decoding import FORMS, TOTAL, TRAIN_CONTEXT
from test_ops_meta import IDS as KIND_IDS
from test_ops_meta import KINDS

CUDA = torch.device("cuda")
CPU = torch.device("cpu")

FP32_OUT, FP32_GRAD = 1e-4, 1e-3
BF16_UNIT = 2.0 ** -8
TOLERANCE = {torch.float32: (FP32_OUT, FP32_GRAD),
             torch.bfloat16: (FP32_OUT + BF16_UNIT * (1 + FP32_OUT), FP32_GRAD + BF16_UNIT * (1 + FP32_GRAD))}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.fixture(autouse=True)
def no_tf32():
    """TF32 off during each test (training turns it on process-wide from ``compute.tf32``), restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    still_off = not (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert still_off, "the test turned TF32 on (training applies compute.tf32): pass compute.tf32=false"


# ----------------------------------------------------------------------------------------------- the op
N_OP = 600
"""Several 64-row band blocks and an FFT far field beyond the 64 exact offsets; the dense reference stays cheap."""
L_BAND = 150
"""The clipped table of the band method (the dense and FFT methods get a table as long as the sequence)."""
OP_CASES = [("prefix", None), ("fused", None),
            *[(m, f) for m in ("dense", "band", "fft", "fused") for f in BIAS_FAMILIES]]
OP_IDS = [m if f is None else f"{m}-{f}" for m, f in OP_CASES]


def op_against_reference(device: torch.device, method: str, family: str | None, dtype: torch.dtype,
                         n: int = N_OP) -> dict[str, float]:
    """Run the op on ``device`` with ``dtype`` inputs, forward and backward, and the float64 reference on the CPU
    over the same (``dtype``-rounded) inputs and output gradient. Returns ``out``, the worst per-position relative
    error, and the relative error in norm of each gradient (``phi_q``, ``phi_k``, ``v``, ``rpe_bias``)."""
    B, H, M, D = 2, 2, 16, 8
    q, k, v = op_inputs(B, H, n, M, D)
    bias = None if family is None else bias_family(family, L_BAND if method == "band" else n, H)
    if method == "fused" and family is not None and family.startswith("decay"):  # the fused path, clipped too
        bias = bias[:, :L_BAND]
    exact = [x.to(dtype).double() for x in (q, k, v, bias) if x is not None]  # the op's inputs, exactly
    g = torch.randn(B, H, n, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype).double()
    leaves = [x.to(device, dtype).requires_grad_() for x in exact]
    out = kernelized_attention(*leaves[:3], leaves[3] if bias is not None else None, method=method)
    assert out.dtype == dtype and out.device.type == device.type and out.shape == v.shape
    grads = torch.autograd.grad(out, leaves, g.to(device, dtype))
    ref_leaves = [x.clone().requires_grad_() for x in exact]
    ref = kernelized_attention_reference(*ref_leaves[:3], ref_leaves[3] if bias is not None else None)
    ref_grads = torch.autograd.grad(ref, ref_leaves, g)
    errors = {"out": worst_relative(out.cpu(), ref)}
    for name, got, want in zip(("phi_q", "phi_k", "v", "rpe_bias"), grads, ref_grads):
        assert got.dtype == dtype and got.device == out.device, name
        errors[name] = norm_relative(got, want)
    return errors


def check_op(device: torch.device, method: str, family: str | None, dtype: torch.dtype) -> None:
    errors = op_against_reference(device, method, family, dtype)
    out_tol, grad_tol = TOLERANCE[dtype]
    assert errors["out"] <= out_tol, errors
    assert max(e for name, e in errors.items() if name != "out") <= grad_tol, errors


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method, family", OP_CASES, ids=OP_IDS)
def test_op_values_and_gradients_match_float64_on_cuda(method, family, dtype):
    check_op(CUDA, method, family, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_packed_documents_equal_each_document_alone_on_cuda(dtype):
    """Document boundaries through the fused kernels on the GPU: a packed row of documents (inside blocks, on block
    edges, past a clipped table's far field) gives each document's attention alone (the float64 reference)."""
    lengths = [100, 64, 1, 300, 135]
    n, B, H, M, D = sum(lengths), 1, 2, 16, 8
    q, k, v = op_inputs(B, H, n, M, D)
    bias = bias_family("noisy_decay", 70, H)
    exact = [x.to(dtype).double() for x in (q, k, v, bias)]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    out = kernelized_attention(*[x.to(CUDA, dtype) for x in exact], method="fused", cu_seqlens=cu.to(CUDA)).cpu()
    parts, start = [], 0
    for length in lengths:
        sl = slice(start, start + length)
        parts.append(kernelized_attention_reference(exact[0][:, :, sl], exact[1][:, :, sl], exact[2][:, :, sl],
                                                    exact[3]))
        start += length
    assert worst_relative(out, torch.cat(parts, dim=2)) <= TOLERANCE[dtype][0]


LONG_N = 32768


def long_sequence_error(device: torch.device, method: str, dtype: torch.dtype, n: int) -> float:
    """Worst per-position relative error of the op on ``device`` at length ``n`` (an LM-like decaying bias: full
    for fft, clipped at 257 offsets for band, none for prefix) on 256 rows (the first and last 64, 128 at random)
    against the float64 formula on the CPU evaluated at those rows only."""
    B, H, M, D = 1, 2, 16, 8
    q, k, v = op_inputs(B, H, n, M, D)
    bias = None if method == "prefix" else bias_family("decay_0.5log", 257 if method in ("band", "fused") else n, H)
    exact = [x.to(dtype).double() for x in (q, k, v, bias) if x is not None]
    on_device = [x.to(device, dtype) for x in exact]
    out = kernelized_attention(*on_device[:3], on_device[3] if bias is not None else None, method=method)
    assert out.dtype == dtype and out.device.type == device.type
    rows = torch.cat([torch.arange(64), torch.arange(n - 64, n),
                      torch.randint(64, n - 64, (128,), generator=torch.Generator().manual_seed(3))])
    ref = kernelized_attention_reference_rows(*exact[:3], exact[3] if bias is not None else None, rows)
    return worst_relative(out[:, :, rows.to(out.device)].cpu(), ref)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["fft", "band", "prefix", "fused"])
def test_op_on_a_long_sequence_matches_float64_rows_on_cuda(method, dtype):
    assert long_sequence_error(CUDA, method, dtype, LONG_N) <= TOLERANCE[dtype][0]


# ----------------------------------------------------------------------------------------------- decoding
def decoding_matches_full_forward(device: torch.device, attention: dict, prompt_len: int, total: int,
                                  rtol: float) -> None:
    """Prefill ``prompt_len`` tokens, then decode up to ``total`` one token at a time on ``device``: every logit
    equals the full forward's over the same tokens (max-norm relative ``rtol``), and stays on ``device``."""
    model = trained_looking_model(**attention).to(device)
    ids = torch.randint(0, 50, (3, total), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        full = model(ids)
    logits, cache = prefill(model, ids[:, :prompt_len])
    assert logits.device == full.device and cache.position == prompt_len
    if prompt_len:
        assert_close(logits, full[:, :prompt_len], rtol, "prefill")
    for t in range(prompt_len, total):
        step = decode_step(model, cache, ids[:, t])
        assert step.device == full.device and step.dtype == torch.float32
        assert_close(step, full[:, t], rtol, f"decode step at {t}")


DECODE_CASES = [pytest.param(FORMS[f], p, TOTAL, 5e-5, id=f"{f}-prompt{p}") for f in FORMS
                for p in (0, TRAIN_CONTEXT + 3)]
DECODE_CASES += [pytest.param(dict(kind="kernelized_rpe", rpe="per_offset", rpe_max_distance=d, method=m), 60, 70,
                              2e-4, id=f"prefill-{m}") for m, d in (("fft", TOTAL + 50), ("band", 6), ("dense", 6),
                                                                    ("fused", 6), ("fused", TOTAL + 50))]
# a long prompt: method auto takes the FFT there on a GPU (general RPE over 3,000 offsets)
DECODE_CASES += [pytest.param(dict(kind="kernelized_rpe", rpe="per_offset", rpe_max_distance=3000), 2990, 3000,
                              2e-4, id="prefill-auto-3000")]


@pytest.mark.cuda
@pytest.mark.parametrize("attention, prompt_len, total, rtol", DECODE_CASES)
def test_decoding_matches_the_full_forward_on_cuda(attention, prompt_len, total, rtol):
    decoding_matches_full_forward(CUDA, attention, prompt_len, total, rtol)


# ----------------------------------------------------------------------------------------------- DeepSpeed
def _deepspeed_step_worker(_rank: int, device: str, port: int, out: str) -> None:
    """In a fresh process: one bf16 step of the plain-torch engine, then one of DeepSpeed ZeRO-1 through
    ``init_distributed`` (a world of one on ``device``'s backend: NCCL on CUDA, gloo on the CPU), from the same
    weights on the same batch; saves what the test compares to ``out``."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR=device)  # this process only
    import torch.distributed as dist

    from conftest import tiny_model, tiny_train_config
    from lm.training.distributed import DistInfo, collective_device, init_distributed, shutdown
    from lm.training.engine import build_engine, token_nll_sum

    if device == "cpu":
        torch.set_num_threads(1)
    batch = torch.randint(0, 50, (8, 13), generator=torch.Generator().manual_seed(100))
    results = {}
    try:
        for kind in ("torch", "deepspeed"):
            cfg = tiny_train_config(f"engine={kind}", f"device={device}", "compute.precision=bf16",
                                    "compute.tf32=false", f"deepspeed.zero_stage={1 if kind == 'deepspeed' else 0}",
                                    "deepspeed.torch_adam=true")
            if kind == "torch":  # no process group: the plain engine of one process
                info = DistInfo("torch", 0, 1, 0, torch.device("cuda", 0) if device == "cuda" else CPU)
            else:
                info = init_distributed(cfg)
            engine = build_engine(cfg, tiny_model(0, config=cfg.model, looks_trained=True).train(), info)
            param = next(engine.module.parameters())
            before = engine.consolidated_state_dict()
            stats = engine.train_step(list(batch.split(2)), batch[:, 1:].numel(), lr=1e-2)
            after = engine.consolidated_state_dict()
            updated = tiny_model(0, config=cfg.model).eval()
            updated.load_state_dict(after)
            with torch.no_grad():  # the updated fp32 weights scored in fp32 on the device
                loss_after = (token_nll_sum(updated.to(info.device), batch.to(info.device)) /
                              batch[:, 1:].numel()).item()
            results[kind] = dict(
                engine=type(engine).__name__, device=str(info.device), param_dtype=str(param.dtype),
                param_device=str(param.device), loss=stats.loss, grad_norm=stats.grad_norm, skipped=stats.skipped,
                update=torch.cat([(after[n] - before[n]).flatten() for n in sorted(after)]),
                loss_after=loss_after, stored={n: (str(t.device), str(t.dtype)) for n, t in after.items()},
                backend=str(dist.get_backend()) if dist.is_initialized() else None,
                collective_device=str(collective_device()))
    finally:
        shutdown()
    torch.save(results, out)


def check_deepspeed_step(device: str, tmp_path) -> None:
    """DeepSpeed bf16 ZeRO-1 (one process) takes the step the plain-torch engine takes: the same loss and gradient
    norm up to bf16 (DeepSpeed runs the whole model in bf16, the plain engine autocasts matmuls only), an update
    in the same direction, and the same loss afterwards; its weights live in bf16 on the device, its collectives
    on the backend's device (NCCL: the GPU)."""
    out = tmp_path / "deepspeed_step.pt"
    mp.spawn(_deepspeed_step_worker, args=(device, free_port(), str(out)), nprocs=1, join=True)
    r = torch.load(out, weights_only=True)
    ds, plain = r["deepspeed"], r["torch"]
    target = "cuda:0" if device == "cuda" else "cpu"
    assert ds["engine"] == "DeepSpeedEngine" and ds["device"] == ds["param_device"] == target
    assert ds["backend"] == ("nccl" if device == "cuda" else "gloo") and ds["collective_device"] == target
    assert ds["param_dtype"] == "torch.bfloat16" and plain["param_dtype"] == "torch.float32"
    assert all(s == ("cpu", "torch.float32") for s in ds["stored"].values())  # consolidated: fp32 on the CPU
    assert not ds["skipped"] and not plain["skipped"]
    assert abs(ds["loss"] - plain["loss"]) <= 1e-2 * plain["loss"], (ds["loss"], plain["loss"])
    assert abs(ds["grad_norm"] - plain["grad_norm"]) <= 2e-2 * plain["grad_norm"], (ds["grad_norm"], plain["grad_norm"])
    cosine = torch.nn.functional.cosine_similarity(ds["update"], plain["update"], dim=0).item()
    assert cosine >= 0.95, cosine
    gain = plain["loss"] - plain["loss_after"]
    assert gain > 0 and abs(ds["loss_after"] - plain["loss_after"]) <= 0.05 * gain, (ds, plain)


@pytest.mark.cuda
def test_deepspeed_bf16_zero1_step_on_one_gpu_matches_the_plain_engine(tmp_path):
    pytest.importorskip("deepspeed")
    check_deepspeed_step("cuda", tmp_path)


# ----------------------------------------------------------------------------------------------- checkpoints
def check_checkpoint_loads_on_cpu(run, trained_on: torch.device) -> None:
    """The checkpoint of ``run`` (trained on ``trained_on``) stores CPU tensors (a machine without that device can
    read it), loads for inference on the CPU, and gives there the logits it gives on ``trained_on``."""
    stored = torch.load(find_checkpoint(run) / WEIGHTS, weights_only=True)  # no map_location: devices as saved
    assert stored and all(t.device == CPU for t in stored.values())
    on_cpu = load_for_inference(run, device="cpu")
    on_device = load_for_inference(run, device=trained_on)
    assert all(t.device == CPU for t in on_cpu.model.state_dict().values())
    ids = torch.randint(0, on_cpu.model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = on_device.model(ids.to(trained_on)).cpu()
        got = on_cpu.model(ids)
    assert_close(got, want, 1e-4, "logits on the CPU vs on the training device")


@pytest.mark.cuda
def test_checkpoint_trained_on_cuda_loads_on_the_cpu(tmp_path):
    run = train_run(tmp_path, "device=cuda", "max_steps=2", "compute.precision=bf16", "compute.tf32=false")
    check_checkpoint_loads_on_cpu(run, CUDA)


# ----------------------------------------------------------------------------------------------- compile
def compiled_matches_eager(device: torch.device, attention: dict, backend: str) -> None:
    """The model under ``torch.compile(fullgraph=True)`` with ``backend`` on ``device`` gives eager's loss and
    gradients (:func:`conftest.compiled_and_eager`)."""
    (loss, grads), (eager_loss, eager_grads) = compiled_and_eager(device, attention, backend)
    assert loss.device.type == device.type
    assert_close(loss, eager_loss, 1e-5, "loss")
    assert grads.keys() == eager_grads.keys()
    for name, g in grads.items():
        assert_close(g, eager_grads[name], 1e-4, name)


# Every attention kind and method through dynamo and AOT autograd with CUDA tensors (aot_eager: the custom op's
# fake implementation, no graph break); one of each kind also through inductor's code generation (a compile takes
# tens of seconds: all nine would not fit the GPU check's budget).
COMPILE_CASES = [pytest.param(kind, "aot_eager", id=f"aot_eager-{i}") for kind, i in zip(KINDS, KIND_IDS)]
COMPILE_CASES += [pytest.param(kind, "inductor", id=f"inductor-{i}") for kind, i in zip(KINDS, KIND_IDS)
                  if i in ("kernelized_rpe-fft", "kernelized-none-prefix", "softmax")]
COMPILE_CASES += [pytest.param(dict(kind="kernelized_rpe", method="fused"), backend, id=f"{backend}-fused")
                  for backend in ("aot_eager", "inductor")]


@pytest.mark.cuda
@pytest.mark.parametrize("attention, backend", COMPILE_CASES)
def test_compiled_model_matches_eager_on_cuda(attention, backend):
    compiled_matches_eager(CUDA, attention, backend)


# ----------------------------------------------------------------------------------------------- the same, on CPU
@pytest.mark.parametrize("method, family, dtype", [
    pytest.param("prefix", None, torch.float32, id="prefix-fp32"),
    pytest.param("dense", "spiky_15", torch.bfloat16, id="dense-spiky_15-bf16"),
    pytest.param("band", "noisy_decay", torch.bfloat16, id="band-noisy_decay-bf16"),
    pytest.param("fft", "rising_15", torch.float32, id="fft-rising_15-fp32"),
    pytest.param("fft", "decay_0.5log", torch.bfloat16, id="fft-decay_0.5log-bf16")])
def test_op_check_on_cpu(method, family, dtype):
    check_op(CPU, method, family, dtype)


@pytest.mark.parametrize("method, dtype", [pytest.param("fft", torch.float32, id="fft-fp32"),
                                           pytest.param("band", torch.bfloat16, id="band-bf16")])
def test_long_sequence_check_on_cpu(method, dtype):
    assert long_sequence_error(CPU, method, dtype, 4096) <= TOLERANCE[dtype][0]


def test_decoding_check_on_cpu():
    decoding_matches_full_forward(CPU, FORMS["rpe-per-offset-clipped"], TRAIN_CONTEXT + 3, TOTAL, 5e-5)


def test_deepspeed_step_check_on_cpu(tmp_path):
    pytest.importorskip("deepspeed")
    check_deepspeed_step("cpu", tmp_path)


def test_checkpoint_check_on_cpu(trained_run):
    check_checkpoint_loads_on_cpu(trained_run, CPU)


def test_compile_check_on_cpu():
    compiled_matches_eager(CPU, dict(kind="kernelized_rpe", method="fft"), "aot_eager")
