"""Benchmark causal kernelized attention (forward + backward): time and peak memory against SDPA.

    python tools/bench_attention.py                        # N = 1k..64k, every case, CPU, 2 threads
    python tools/bench_attention.py --n 4096 16384 --cases fft band sdpa --bias decay --rounds 3
    python tools/bench_attention.py --device cuda          # GPU: SDPA flash (bf16), each op case also on float64
                                                           # and on bfloat16 inputs

Cases: ``fft`` / ``band`` (clipped RPE, L = --band-l) / ``prefix`` (no RPE) / ``dense`` = lm.ops.kernelized_attention
with that method forced; ``fused`` (general RPE, as ``fft``) / ``fused_band`` (clipped, as ``band``) /
``fused_prefix`` (no RPE, as ``prefix``) = the fused Triton method on the same inputs (CUDA, or CPU under
TRITON_INTERPRET=1); its FFT precision chosen as the model does (lm.ops.precision policy from the bias, passed
explicitly: no host read in the timed call); ``fft_far64`` = ``fft`` with the far field forced to float64 (what
rising biases cost); ``sdpa`` = torch scaled_dot_product_attention(is_causal=True) on q, k, v of shape
(B, H, N, D): float32 on CPU, bfloat16 with the flash backend on CUDA; ``reference`` = the dense float64
reference; ``materialised`` = the FFT as the paper describes it (phi_k (x) v materialised for the whole sequence
and transformed at once, plain autograd). ``--fp64`` adds each op case run on float64 inputs (suffix ``@fp64``);
``--baseline-src DIR`` adds each op case run with the ``lm`` package of another checkout (suffix ``@base``; e.g.
a ``git worktree`` of an older commit), so old and new code are measured in the same interleaved rounds.

``--bf16`` adds each op case run on bfloat16 inputs (suffix ``@bf16``; the op computes in float32 inside, as
under DeepSpeed bf16).

Every case runs in a fresh subprocess, so peak memory is clean: on CPU the peak resident set (VmHWM, reset via
/proc/self/clear_refs) minus the resident set once the inputs exist; on CUDA max_memory_allocated minus the
memory allocated by the inputs. ``--no-isolate`` runs the cases in this process instead (CUDA: peak memory
stats are reset per case, so the figure stays exact, and no case pays a CUDA start-up; a case that runs out of
memory is reported and the run goes on; CPU: the resident set then carries what earlier cases left).
Cases are interleaved: ``--rounds`` passes over all cases at one N, so a machine whose load changes biases them
alike; each case times --repeats forward + backward runs after one warm-up (skipped when a run takes over 20 s),
and the best over all rounds is kept. Prints a table with the ratio to SDPA at the same N, the case's fewest
FLOPs and bytes (:func:`case_cost`, its roofline) and the rates they imply, the time the GPU cost model predicts
(``lm.ops.cost``: FlashAttention-2's figure for ``sdpa``) and measured / predicted, and writes results.json and
plot.png under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CASES = ("fft", "fft_far64", "band", "prefix", "dense", "fused", "fused_band", "fused_prefix", "sdpa", "reference",
         "materialised")
OP_CASES = ("fft", "fft_far64", "band", "prefix", "dense", "fused", "fused_band", "fused_prefix")
FUSED = {"fused": "fused", "fused_band": "fused", "fused_prefix": "fused"}  # case -> method
BIASES = {
    "init": "zero-mean, 0.02 * randn per offset (as at initialisation; spans ~0.2 nats)",
    "decay": "-0.5 log(1 + t) (a locality prior as LMs learn; float32 FFT)",
    "wide": "uniform in [-7.5, 7.5] per offset (spans 15 nats; i.i.d.: float64 FFT far field)",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536],
                   help="sequence lengths")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES, help="what to run")
    p.add_argument("--fp64", action=argparse.BooleanOptionalAction, default=None,
                   help="also run every op case on float64 inputs (default: on for CUDA, off for CPU)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="also run every op case on bfloat16 inputs (default: on for CUDA, off for CPU)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="each case in a fresh process (default); --no-isolate: all in this one")
    p.add_argument("--baseline-src", type=Path, default=None,
                   help="a checkout whose lm package is benchmarked too (op cases, suffix @base)")
    p.add_argument("--bias", default="init", choices=sorted(BIASES), help="RPE bias for fft/band/dense/materialised")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64, help="D")
    p.add_argument("--features", type=int, default=16, help="M")
    p.add_argument("--band-l", type=int, default=257, help="L of the clipped RPE for the band case")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per process")
    p.add_argument("--rounds", type=int, default=1, help="interleaved passes over all cases at each N")
    p.add_argument("--dense-max-n", type=int, default=8192, help="largest N for the dense method")
    p.add_argument("--reference-max-n", type=int, default=2048, help="largest N for the float64 reference")
    p.add_argument("--max-memory-gb", type=float, default=8.0,
                   help="skip cases whose estimated memory exceeds this (materialised FFT, dense, reference)")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds per case before it is abandoned (isolated cases only)")
    p.add_argument("--cpu-threads", type=int, default=0, help="the op's cpu_threads (0: --threads)")
    p.add_argument("--out", type=Path, default=Path("bench_results/attention"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- one case

def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _materialised_fft(phi_q, phi_k, v, bias):
    """The paper's FFT: phi_k (x) [v, 1] for the whole sequence, one rfft/irfft, plain autograd."""
    import torch
    from lm.ops.fft import fft_size
    n = v.shape[2]
    nfft = fft_size(2 * n - 1)
    offsets = torch.arange(n, device=v.device).clamp(max=bias.shape[-1] - 1)
    c = torch.exp(bias - bias.amax(-1, keepdim=True))[:, offsets]  # (H, N)
    u = torch.cat([v, torch.ones_like(v[..., :1])], -1)
    x = phi_k.unsqueeze(-1) * u.unsqueeze(-2)  # (B, H, N, M, D+1)
    spec = torch.fft.rfft(x, n=nfft, dim=2) * torch.fft.rfft(c, n=nfft)[None, :, :, None, None]
    s = torch.fft.irfft(spec, n=nfft, dim=2)[:, :, :n]
    y = torch.einsum("bhnm,bhnme->bhne", phi_q, s)
    return y[..., :-1] / y[..., -1:]


def make_bias(kind: str, H: int, L: int, g):
    import torch
    if kind == "init":
        return 0.02 * torch.randn(H, L, generator=g)
    if kind == "decay":
        return (-0.5 * torch.log1p(torch.arange(L, dtype=torch.float64))).float().expand(H, L).contiguous()
    return (torch.rand(H, L, generator=g) - 0.5) * 15.0


def run_case(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F
    import inspect
    from lm.ops import kernelized_attention
    from lm.ops.reference import kernelized_attention_reference
    new_api = "fft_dtype" in inspect.signature(kernelized_attention).parameters  # else an older checkout

    torch.set_num_threads(spec["threads"])
    dev = torch.device(spec["device"])
    B, H, N, D, M = spec["batch"], spec["heads"], spec["n"], spec["head_dim"], spec["features"]
    case, fp64 = spec["case"].split("@")[0], spec["case"].endswith("@fp64")
    g = torch.Generator().manual_seed(0)
    dtype = (torch.float64 if case == "reference" or fp64 else
             torch.bfloat16 if spec["case"].endswith("@bf16") else torch.float32)
    L = spec["band_l"] if case in ("band", "fused_band") else N
    bias = make_bias(spec["bias"], H, L, g)
    precision = None
    if case in ("fft", "fft_far64") and new_api:  # the model's policy, decided outside the timed call
        from lm.ops.precision import fp32_max_lengths
        precision = torch.float32 if N <= fp32_max_lengths([bias])[0] and case == "fft" else torch.float64
    bias = bias.to(dev, dtype).requires_grad_()
    if case == "sdpa":
        sdpa_dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        ins = [torch.randn(B, H, N, D, generator=g).to(dev, sdpa_dtype).requires_grad_() for _ in range(3)]

        def fn():
            if dev.type != "cuda":
                return F.scaled_dot_product_attention(*ins, is_causal=True)
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(*ins, is_causal=True)
        grad = torch.randn(B, H, N, D, generator=g).to(dev, sdpa_dtype)
    else:
        ins = [torch.rand(B, H, N, M, generator=g).to(dev, dtype).requires_grad_(),
               torch.rand(B, H, N, M, generator=g).to(dev, dtype).requires_grad_(),
               torch.randn(B, H, N, D, generator=g).to(dev, dtype).requires_grad_()]
        if case == "reference":
            def fn():
                return kernelized_attention_reference(*ins, bias)
        elif case == "materialised":
            def fn():
                return _materialised_fft(*ins, bias)
        else:
            rpe = None if case in ("prefix", "fused_prefix") else bias
            method = "fft" if case == "fft_far64" else FUSED.get(case, case)
            threads, fft_dtype = spec["cpu_threads"], precision

            kw = dict(fft_dtype=fft_dtype, cpu_threads=threads) if new_api else {}

            def fn():
                return kernelized_attention(*ins, rpe, method=method, **kw)
        grad = torch.randn(B, H, N, D, generator=g).to(dev, dtype)
    if case == "materialised":
        precision = dtype
    if fp64 and precision is not None:
        precision = torch.float64
    precision = None if precision is None else str(precision).split(".")[-1]

    def once() -> float:
        for x in ins + [bias]:
            x.grad = None
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn().backward(grad)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_kib("VmRSS") * 1024
        _reset_peak_rss()
    first = once()
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda" else _rss_kib("VmHWM") * 1024) - base
    times = [first]
    if first < 20.0:
        times = [once() for _ in range(spec["repeats"])]
    return {"time_s": min(times), "peak_mem_bytes": max(peak, 0), "fft_precision": precision}


def case_cost(spec: dict) -> dict | None:
    """The roofline of one forward + backward of ``spec``'s case: its fewest FLOPs, the fewest bytes it must move,
    and the arithmetic they run in (``compute``: bf16 / fp32 / fp64, which ceiling applies). None for the float64
    reference and the paper's materialised FFT (they are not candidates).

    FLOPs per (batch, head), a multiply-add counting 2, ``E = D + 1`` columns (values and the normaliser), backward
    = 2 x forward for the op (2.5 x for SDPA, FlashAttention's convention), forward:
    prefix ``4 N M E`` (running sums of ``k (x) u``, then ``q . S``); band adds the exact near band
    ``2 N L (M + E)``; fft a band of ``NEAR_BAND`` offsets plus, for each of the ``M E`` far-field channels, the
    products ``k (x) u`` (N), a real FFT of length ``nfft ~ 2N`` each way (``2.5 nfft log2 nfft`` each), the
    spectral product (``3 nfft``) and the contraction with ``q`` (2N); dense ``N^2 (M + E)`` (causal half);
    SDPA ``2 N^2 D`` (causal halves of ``QK^T`` and ``PV``). Bytes: each input read by forward and again by
    backward, the output written and grad_out read once, each gradient written once, in the inputs' dtype
    (op: ``6 N M + 5 N D`` elements per (batch, head) and the bias three times; SDPA: ``12 N D`` and its float32
    log-sum-exp twice)."""
    import math
    from lm.ops.fft import fft_size
    from lm.ops.precision import NEAR_BAND
    case, _, variant = spec["case"].partition("@")
    B, H, N, D, M = spec["batch"], spec["heads"], spec["n"], spec["head_dim"], spec["features"]
    E, BH = D + 1, B * H
    if case in ("reference", "materialised"):
        return None
    if case == "sdpa":
        bf16 = spec["device"].startswith("cuda")
        return {"flops": 3.5 * 2 * N * N * D * BH, "min_bytes": BH * (12 * N * D * (2 if bf16 else 4) + 8 * N),
                "compute": "bf16" if bf16 else "fp32"}
    fused = case in FUSED
    case = {"fused": "dense", "fused_band": "band", "fused_prefix": "prefix"}.get(case, case)  # the same work
    elt = {"fp64": 8, "bf16": 2}.get(variant, 4)
    compute = "fp64" if variant == "fp64" or case == "fft_far64" else ("bf16" if fused and variant == "bf16"
                                                                       else "fp32")
    prefix = 4 * N * M * E
    if case == "prefix":
        forward, L = prefix, 0
    elif case == "band":
        L = spec["band_l"]
        forward = 2 * N * min(L, N) * (M + E) + prefix
    elif case == "dense":
        forward, L = N * N * (M + E), N
    else:  # fft, fft_far64
        nfft, L = fft_size(2 * N - 1), N
        per_channel = N + 5 * nfft * math.log2(nfft) + 3 * nfft + 2 * N
        forward = 2 * N * min(NEAR_BAND, N) * (M + E) + prefix + M * E * per_channel
    return {"flops": 3.0 * forward * BH, "min_bytes": elt * (BH * (6 * N * M + 5 * N * D) + 3 * H * L),
            "compute": compute}


def predicted(spec: dict) -> dict:
    """The GPU cost model's time for the case (``lm.ops.cost``, an H100 SXM), or nothing for cases it does not
    cover (and for checkouts without it)."""
    try:
        import torch
        from lm.ops.cost import Shape, fa2_cost, method_cost
    except ImportError:
        return {}
    case, _, variant = spec["case"].partition("@")
    B, H, N, D, M = spec["batch"], spec["heads"], spec["n"], spec["head_dim"], spec["features"]
    if case == "sdpa":
        return {"predicted_ms": fa2_cost(B, H, N, D).ms}
    if case not in OP_CASES or case == "fft_far64" or variant == "base":
        return {}
    dtype = {"bf16": torch.bfloat16, "fp64": torch.float64}.get(variant, torch.float32)
    L = None if case in ("prefix", "fused_prefix") else (min(spec["band_l"], N) if case in ("band", "fused_band")
                                                         else N)
    return {"predicted_ms": method_cost(FUSED.get(case, case), Shape(B, H, N, M, D, L, dtype)).ms}


def run_here(spec: dict) -> dict:
    """``run_case`` in this process; a failure (e.g. out of memory) becomes a skipped result and the run goes on."""
    import gc
    import torch
    cuda = spec["device"].startswith("cuda")
    try:
        return run_case(spec)
    except Exception as e:  # reported in the table like a failed subprocess
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)
        return {"skipped": "failed (out of memory)" if oom else
                f"failed ({type(e).__name__}: {(str(e).splitlines() or ['?'])[0][:200]})"}
    finally:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- driver

def skip_reason(case: str, n: int, a: argparse.Namespace) -> str | None:
    BH, E = a.batch * a.heads, a.head_dim + 1
    gb = 2.0 ** 30
    if case == "dense" and n > a.dense_max_n:
        return f"N > --dense-max-n={a.dense_max_n}"
    if case == "dense" and 6 * BH * n * n * 4 > a.max_memory_gb * gb:
        return "(N, N) scores do not fit --max-memory-gb"
    if case == "reference" and n > a.reference_max_n:
        return f"N > --reference-max-n={a.reference_max_n}"
    if case == "materialised":
        est = BH * n * a.features * E * 4 * 16  # x, its 2N-point spectrum, products, saved (16x measured)
        if est > a.max_memory_gb * gb:
            return f"needs ~{est / gb:.0f} GiB (> --max-memory-gb={a.max_memory_gb:g})"
    return None


def run_in_subprocess(spec: dict, timeout: float, source: Path | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    if source is not None:  # import lm from that checkout, leave its files alone
        env.update(PYTHONPATH=str(source.resolve()), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"skipped": f"took longer than --timeout={timeout:g} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"skipped": f"failed ({'out of memory' if proc.returncode in (-9, 137) else tail})"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        print(json.dumps(run_case(json.loads(a.worker))))
        return 0
    if a.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda given but torch.cuda.is_available() is False")
    a.out.mkdir(parents=True, exist_ok=True)
    cases = sorted(a.cases, key=lambda c: c != "sdpa")  # SDPA first: the others are ratios to it
    if a.bf16 or (a.bf16 is None and a.device.startswith("cuda")):
        cases += [f"{c}@bf16" for c in a.cases if c in OP_CASES]
    if a.fp64 or (a.fp64 is None and a.device.startswith("cuda")):
        cases += [f"{c}@fp64" for c in a.cases if c in OP_CASES]
    if a.baseline_src:
        if not (a.baseline_src / "lm" / "ops").is_dir():
            raise SystemExit(f"--baseline-src {a.baseline_src}: no lm/ops package there")
        cases += [f"{c}@base" for c in a.cases if c in OP_CASES and c != "fft_far64"]
    sdpa = "bfloat16, flash backend" if a.device.startswith("cuda") else "float32"
    print(f"B={a.batch} H={a.heads} D={a.head_dim} M={a.features} band L={a.band_l} device={a.device} "
          f"threads={a.threads}; bias '{a.bias}': {BIASES[a.bias]}; SDPA {sdpa}; forward + backward, best of "
          f"{a.rounds} interleaved round(s) x {a.repeats}")
    rows = []
    header = (f"{'N':>6} {'case':<18} {'time s':>9} {'x SDPA':>7} {'peak MiB':>9}  {'fft':<7} {'GFLOP':>9} "
              f"{'TFLOP/s':>8} {'min MB':>8} {'GB/s':>7} {'pred ms':>8} {'meas/pred':>9}")
    print(header)
    print("-" * len(header))
    for n in a.n:
        results = {c: [] for c in cases}
        specs = {c: dict(case=c, n=n, device=a.device, threads=a.threads, batch=a.batch, heads=a.heads,
                         head_dim=a.head_dim, features=a.features, band_l=a.band_l, repeats=a.repeats, bias=a.bias,
                         cpu_threads=a.cpu_threads) for c in cases}
        for _ in range(a.rounds):
            for c in cases:
                if results[c] and "skipped" in results[c][-1]:
                    continue
                reason = skip_reason(c.split("@")[0], n, a)
                source = a.baseline_src if c.endswith("@base") else None
                if reason:
                    results[c].append({"skipped": reason})
                elif a.isolate or source is not None:
                    results[c].append(run_in_subprocess(specs[c], a.timeout, source))
                else:
                    results[c].append(run_here(specs[c]))
        sdpa_time = None
        for c in cases:
            done = [r for r in results[c] if "time_s" in r]
            res = ({"time_s": min(r["time_s"] for r in done), "times_s": [r["time_s"] for r in done],
                    "peak_mem_bytes": max(r["peak_mem_bytes"] for r in done), "fft_precision": done[0]["fft_precision"]}
                   if done else results[c][-1])
            row = dict(specs[c], **res, **(case_cost(specs[c]) or {}), **predicted(specs[c]))
            if c == "sdpa" and "time_s" in res:
                sdpa_time = res["time_s"]
            if "time_s" in res and sdpa_time:
                row["ratio_to_sdpa"] = res["time_s"] / sdpa_time
            rows.append(row)
            if "skipped" in res:
                print(f"{n:>6} {c:<18} skipped: {res['skipped']}")
            else:
                ratio = f"{row['ratio_to_sdpa']:.3f}" if "ratio_to_sdpa" in row else "-"
                roofline = (f" {row['flops'] / 1e9:>9.4g} {row['flops'] / res['time_s'] / 1e12:>8.4g} "
                            f"{row['min_bytes'] / 1e6:>8.4g} {row['min_bytes'] / res['time_s'] / 1e9:>7.4g}"
                            if "flops" in row else "")
                if "predicted_ms" in row:
                    row["measured_over_predicted"] = 1e3 * res["time_s"] / row["predicted_ms"]
                    roofline += f" {row['predicted_ms']:>8.4g} {row['measured_over_predicted']:>9.3g}"
                print(f"{n:>6} {c:<18} {res['time_s']:>9.3f} {ratio:>7} {res['peak_mem_bytes'] / 2**20:>9.0f}"
                      f"  {res['fft_precision'] or '':<7}{roofline}", flush=True)
    from lm.fileio import atomic_write_text  # here, not at the top: workers may import an older checkout's lm
    atomic_write_text(a.out / "results.json", json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                                         "bias": BIASES[a.bias], "rows": rows}, indent=1))
    plot(rows, a.out / "plot.png", f"{a.device}, {a.threads} threads, B={a.batch} H={a.heads} D={a.head_dim} "
                                    f"M={a.features}, bias {a.bias}")
    print(f"wrote {a.out / 'results.json'} and {a.out / 'plot.png'}")
    return 0


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for case in dict.fromkeys(r["case"] for r in rows):
        pts = [r for r in rows if r["case"] == case and "time_s" in r]
        if not pts:
            continue
        ns = [r["n"] for r in pts]
        ax_t.plot(ns, [r["time_s"] for r in pts], "o-", label=case)
        ax_m.plot(ns, [max(r["peak_mem_bytes"], 1) / 2**20 for r in pts], "o-", label=case)
    for ax, label in ((ax_t, "forward + backward time (s)"), (ax_m, "peak memory above inputs (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    from lm.fileio import atomic_write
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
