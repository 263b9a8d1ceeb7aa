#!/usr/bin/env python
"""The GPU check's measurement of the machine, and its report (tools/gpu_check.sh runs both; docs/gpu.md).

    python tools/bench_report.py machine OUT --device cuda    # OUT/machine.json: versions, the GPU, its ceilings
    python tools/bench_report.py report OUT --mode cuda       # OUT/gpu_report.md + OUT/gpu_report.json, printed

``machine`` records the versions that matter (Python, torch, CUDA, cuDNN, NCCL, triton, DeepSpeed, omegaconf,
datasets, ... and where each was imported from: a carried wheel or the machine), the GPU (name, memory,
multiprocessors, compute capability, driver) and the ceilings measured once: device-to-device copy bandwidth
(bytes read + written per second, 1 GiB buffers) and the bf16 and fp32 (TF32 off) matmul rates (8192^3, the mean
of 10 after 3 warm-ups; on the CPU 64 MiB and 1024^3).

``report`` reads what the stages left in OUT (``stages.jsonl``, each stage's log, ``attention/results.json``,
``train/train.json``, ``wikitext/``, ``generate/generate.json``) and writes one report: the machine, each stage's
outcome (what failed and why, with the end of its log), and each stage's table. Where a stage has a roofline,
the table gives the time its fewest FLOPs and bytes take at the measured ceilings (``bound``, the larger of the
two, and which one it is) and how many times that bound the measurement took (``x bound``; 1 is the chip's
limit). Exit status of ``report``: 0 when every stage that ran passed, else 1.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lm.fileio import atomic_write_text

STAGES = ("machine", "tests", "attention", "train", "wikitext", "generate")
TITLES = {
    "machine": "Machine and ceilings",
    "tests": "1. CUDA tests (`pytest -m cuda tests/test_cuda.py`)",
    "attention": "2. Attention: the op vs flash SDPA, forward + backward (`tools/bench_attention.py`)",
    "train": "3. Training throughput, bf16 (`tools/bench_train.py`)",
    "wikitext": "4. WikiText-103 sample through `NGPU=1 ./launch.sh configs/wikitext103.yaml` (DeepSpeed)",
    "generate": "5. Decoding (`tools/bench_generate.py`)",
}
PACKAGES = ("torch", "triton", "deepspeed", "omegaconf", "datasets", "sentencepiece", "numpy", "pyarrow",
            "tensorboard", "pydantic")
CHECKS = {
    "test_op_values_and_gradients_match_float64_on_cuda": "op vs float64: every method x bias family, values and "
                                                          "gradients, fp32 and bf16 inputs",
    "test_op_on_a_long_sequence_matches_float64_rows_on_cuda": "op on 32k tokens vs float64 rows",
    "test_decoding_matches_the_full_forward_on_cuda": "prefill + decode steps vs the full forward",
    "test_deepspeed_bf16_zero1_step_on_one_gpu_matches_the_plain_engine": "DeepSpeed bf16 ZeRO-1 step (NCCL, one "
                                                                           "GPU) vs the plain-torch engine",
    "test_checkpoint_trained_on_cuda_loads_on_the_cpu": "checkpoint trained on CUDA, loaded on the CPU",
    "test_compiled_model_matches_eager_on_cuda": "torch.compile(fullgraph=True) vs eager: every kind and method "
                                                 "(aot_eager), one of each kind (inductor)",
}


# ----------------------------------------------------------------------------------------------- machine
def package_versions() -> dict:
    """``{name: {"version", "from"}}`` for :data:`PACKAGES` (found without importing them; None: absent)."""
    out = {}
    for name in PACKAGES:
        try:
            version = importlib.metadata.version(name)
            spec = importlib.util.find_spec(name)
        except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
            out[name] = None
            continue
        origin = spec.origin if spec is not None and spec.origin else "?"
        out[name] = {"version": version, "from": str(Path(origin).parent.parent)}
    return out


def git_commit() -> str:
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"
    return done.stdout.strip() or "unknown (not a git checkout)"


def gpu_driver() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else "unknown"


def ceilings(device: str) -> dict:
    """Copy bandwidth (GB/s, read + written) and bf16 / fp32 matmul rates (TFLOP/s; TF32 off) on ``device``."""
    import torch
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def seconds(fn, warmup: int = 3, repeats: int = 10) -> float:
        for _ in range(warmup):
            fn()
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return (time.perf_counter() - start) / repeats

    nbytes = 2**30 if cuda else 2**26
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    result = {"copy_gbs": 2 * nbytes / seconds(lambda: dst.copy_(src)) / 1e9, "copy_bytes": nbytes}
    del src, dst
    size = 8192 if cuda else 1024
    g = torch.Generator(device=dev).manual_seed(0)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 as fp32: the op's own arithmetic
    try:
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            a = torch.randn(size, size, device=dev, dtype=dtype, generator=g)
            b = torch.randn(size, size, device=dev, dtype=dtype, generator=g)
            result[f"{name}_tflops"] = 2 * size**3 / seconds(lambda: a @ b) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    result["matmul_size"] = size
    return result


def machine(out: Path, device: str) -> dict:
    import torch
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "host": platform.node(), "python": platform.python_version(), "executable": sys.executable,
            "lm": git_commit(), "packages": package_versions(), "device": device}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        try:
            import torch.cuda.nccl
            nccl = torch.cuda.nccl.version()
        except (ImportError, RuntimeError, AttributeError):
            nccl = None
        info["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
                       "multiprocessors": p.multi_processor_count, "capability": f"{p.major}.{p.minor}",
                       "driver": gpu_driver()}
        info["cuda"] = {"runtime": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                        "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)}
    else:
        info["cpu"] = {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "name": platform.processor()}
    info["ceilings"] = ceilings(device)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "machine.json", json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))
    return info


# ----------------------------------------------------------------------------------------------- reading
def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def log_tail(path: Path, lines: int = 12) -> list[str]:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line[:240] for line in text if line.strip()][-lines:]


REASON = re.compile(r"^(gpu_check: .*|error: .*|\w*(Error|Exception|Interrupt)\b:?.*|FAILED .*|ERROR .*|"
                    r"Killed.*|.*out of memory.*)$")


def reason_from_log(path: Path) -> str:
    """The line of a log that says best why it failed: the last error-looking line, else the last line."""
    tail = log_tail(path, 400)
    for line in reversed(tail):
        if REASON.match(line.strip()):
            return line.strip()[:300]
    return tail[-1].strip()[:300] if tail else "no output"


def stage_records(out: Path) -> list[dict]:
    """Each stage's outcome: ``status`` passed / failed / timed out / not run, ``reason``, ``seconds``, the log's
    end (a stage missing from stages.jsonl is "not run": the script stopped before it)."""
    seen = {}
    try:
        for line in (out / "stages.jsonl").read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                seen[rec["stage"]] = rec
    except (OSError, ValueError):
        pass
    records = []
    for name in STAGES:
        rec = dict(seen.get(name) or {"stage": name, "rc": None, "budget_s": None, "seconds": None, "log": None})
        rc, log = rec["rc"], out / rec["log"] if rec.get("log") else None
        if rc is None:
            rec.update(status="not run", reason="not selected (LM_GPU_CHECK_STAGES)" if name in seen else
                       "the check stopped before this stage")
        elif rc == 0:
            rec.update(status="passed", reason="")
        elif rc in (124, 137):
            rec.update(status="timed out", reason=f"stopped at its budget of {rec['budget_s']} s (the end of its "
                                                  f"log is under 'What failed')")
        else:
            rec.update(status="failed", reason=f"exit status {rc}: {reason_from_log(log)}")
        rec["tail"] = log_tail(log) if log is not None and rec["status"] != "passed" else []
        records.append(rec)
    return records


# ----------------------------------------------------------------------------------------------- tables
TEXT_COLUMNS = {"stage", "status", "why", "check", "case", "variant", "model"}


def table(head: list[str], rows: list[list]) -> list[str]:
    """A markdown table (None cells print as ``-``; text columns left-aligned, numbers right-aligned)."""
    cells = [[("-" if c is None else str(c).replace("|", "/")) for c in r] for r in rows]
    rule = "|" + "|".join("---" if h in TEXT_COLUMNS else "---:" for h in head) + "|"
    return ["| " + " | ".join(head) + " |", rule] + ["| " + " | ".join(r) + " |" for r in cells]


def num(x, fmt: str = ".3g") -> str | None:
    return None if x is None else format(x, fmt)


def bound(flops: float | None, nbytes: float | None, peak_tflops: float | None, gbs: float | None):
    """(seconds the fewest FLOPs / bytes take at the ceilings, "compute" / "memory") or (None, None)."""
    t_flops = flops / (peak_tflops * 1e12) if flops and peak_tflops else 0.0
    t_bytes = nbytes / (gbs * 1e9) if nbytes and gbs else 0.0
    if not (t_flops or t_bytes):
        return None, None
    return max(t_flops, t_bytes), ("compute" if t_flops >= t_bytes else "memory")


def tests_section(out: Path, log_name: str) -> tuple[list[str], dict]:
    text = (out / log_name).read_text(errors="replace") if (out / log_name).is_file() else ""
    results = re.findall(r"^tests/\S+?::(\w+)(\[\S*\])? (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", text, re.M)
    failures = re.findall(r"^(?:FAILED|ERROR) (\S+)(?: - (.*))?$", text, re.M)
    skips = sorted(set(re.findall(r"^SKIPPED \[\d+\] \S+: (.*)$", text, re.M)))
    selected = re.search(r"collected (\d+) items?(?: / (\d+) deselected)?(?: / (\d+) selected)?", text)
    counts: dict[str, dict[str, int]] = {}
    for func, _, outcome in results:
        c = counts.setdefault(func, {"passed": 0, "failed": 0, "skipped": 0})
        c["failed" if outcome in ("FAILED", "ERROR") else "passed" if outcome in ("PASSED", "XFAIL") else
          "skipped"] += 1
    expected = None
    if selected:
        expected = int(selected.group(3) or int(selected.group(1)) - int(selected.group(2) or 0))
    data = {"counts": counts, "failures": [{"test": t, "message": m} for t, m in failures], "skip_reasons": skips,
            "selected": expected, "reported": len(results)}
    rows = [[CHECKS.get(f, f), c["passed"], c["failed"], c["skipped"]] for f, c in counts.items()]
    lines = table(["check", "passed", "failed", "skipped"], rows) if rows else ["No test reported a result."]
    if expected is not None and expected > len(results):
        lines.append(f"\n{expected - len(results)} of {expected} selected tests reported no result (the stage "
                     f"stopped first).")
    if skips:
        lines.append("\nSkip reasons: " + "; ".join(skips))
    for f in failures[:15]:
        lines.append(f"- FAILED `{f[0]}`: {(f[1] or '')[:300]}")
    if len(failures) > 15:
        lines.append(f"- ... and {len(failures) - 15} more (tests.log)")
    return lines, data


def attention_section(out: Path, ceil: dict) -> tuple[list[str], dict]:
    data = read_json(out / "attention" / "results.json")
    if not data:
        return ["No results (attention/results.json is missing)."], {}
    rows = []
    for r in data["rows"]:
        if "time_s" not in r:
            rows.append([r["n"], r["case"], f"skipped: {r.get('skipped')}", None, None, None, None, None, None])
            continue
        t, kind = bound(r.get("flops"), r.get("min_bytes"), ceil.get(f"{r.get('compute')}_tflops"),
                        ceil.get("copy_gbs"))
        r["bound_s"], r["limit"] = t, kind
        rows.append([r["n"], r["case"], num(r["time_s"] * 1e3), num(r.get("ratio_to_sdpa")),
                     num(r["peak_mem_bytes"] / 2**20, ".0f"), num(r.get("flops", 0) / 1e9 or None),
                     num(r.get("min_bytes", 0) / 1e6 or None), num(t * 1e3 if t else None),
                     f"{r['time_s'] / t:.3g} ({kind})" if t else None, num(r.get("predicted_ms")),
                     num(r.get("measured_over_predicted"))])
    head = ["N", "case", "time ms", "x SDPA", "peak MiB", "GFLOP", "min MB", "bound ms", "x bound", "predicted ms",
            "measured / predicted"]
    fit = refit(data["rows"])
    if fit:
        rows_fit = [[case, f"{v:.3g}", n] for case, (v, n) in sorted(fit.items())]
        data["cost_model_fit"] = {case: v for case, (v, _) in fit.items()}
    note = (f"B={data['args'].get('batch')} H={data['args'].get('heads')} D={data['args'].get('head_dim')} "
            f"M={data['args'].get('features')}, band L={data['args'].get('band_l')}, bias: {data.get('bias')}; "
            f"`@bf16`: bfloat16 inputs; SDPA: bfloat16, flash backend (on CUDA). `peak MiB`: above the inputs.")
    lines = [note, ""] + table(head, rows)
    if fit:
        lines += ["", "Cost model (`lm/ops/cost.py`, an H100 SXM at 40% of its matmul peak) against this GPU: the "
                  "median of measured / predicted per case over N. Multiply a case's predictions by it (or set "
                  "`GPU(efficiency=...)` and the bandwidth to this GPU's) before trusting `auto`'s ranking here.", ""]
        lines += table(["case", "median measured / predicted", "rows"], rows_fit)
    return lines, data


def refit(rows: list[dict]) -> dict[str, tuple[float, int]]:
    """Per case, the median of measured / predicted over the lengths it ran at, and how many rows."""
    by_case: dict[str, list[float]] = {}
    for r in rows:
        if r.get("measured_over_predicted"):
            by_case.setdefault(r["case"], []).append(r["measured_over_predicted"])
    return {c: (sorted(v)[len(v) // 2], len(v)) for c, v in by_case.items()}


def train_section(out: Path, ceil: dict) -> tuple[list[str], dict]:
    data = read_json(out / "train" / "train.json")
    if not data:
        return ["No results (train/train.json is missing)."], {}
    args = data["args"]
    peak = ceil.get("bf16_tflops" if args.get("precision") == "bf16" else "fp32_tflops")
    rows = []
    for r in data["results"]:
        if "tokens_per_s" not in r:
            rows.append([r["context"], r["variant"], r["batch"], f"skipped: {r.get('skipped')}", None, None, None,
                         None])
            continue
        base = next((b for b in data["results"] if b["context"] == r["context"] and b["variant"] == "softmax"
                     and "tokens_per_s" in b), None)
        r["mfu"] = r["tflops"] / peak if peak else None
        rows.append([r["context"], r["variant"], r["batch"], f"{r['tokens_per_s']:,.0f}",
                     num(r["tokens_per_s"] / base["tokens_per_s"]) if base else None,
                     num(r["peak_mem_bytes"] / 2**20, ",.0f") if r.get("peak_mem_bytes") is not None else None,
                     num(r["tflops"]), f"{r['mfu']:.1%}" if r["mfu"] is not None else None])
    note = (f"{args.get('layers')} layers, d_model {args.get('d_model')}, {args.get('heads')} heads, "
            f"{args.get('features')} features, vocabulary {args.get('vocab')}, {args.get('tokens_per_step')} tokens "
            f"per step, {args.get('precision')}, plain-torch engine. MFU: model FLOPs (bench_train.py "
            f"`model_flops_per_token`) per second over the measured {args.get('precision')} matmul rate.")
    head = ["context", "variant", "batch", "tokens/s", "x softmax", "peak MiB", "TFLOP/s", "MFU"]
    return [note, ""] + table(head, rows), data


def wikitext_section(out: Path) -> tuple[list[str], dict]:
    d = out / "wikitext"
    steps = []
    try:
        steps = [json.loads(x) for x in (d / "run" / "steps.jsonl").read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        pass
    losses = [s["loss"] for s in steps if s.get("loss") is not None]
    data: dict = {"steps": len(steps)}
    lines = []
    if losses:
        k = max(1, min(10, len(losses) // 5))
        first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
        data.update(first_loss=first, last_loss=last, loss_falls=last < first)
        lines.append(f"- {len(steps)} steps; loss (mean of {k} steps) {first:.3f} at the start, {last:.3f} at the end: "
                     f"{'falls' if last < first else 'DOES NOT FALL'}")
    else:
        lines.append("- no training steps recorded (wikitext/run/steps.jsonl)")
    try:
        rates = [float(x.replace(",", "")) for x in re.findall(r"\| ([\d,.]+) tok/s", (d / "train.log").read_text())]
    except OSError:
        rates = []
    if rates:
        data["tokens_per_s"] = statistics.median(rates[1:] or rates)
        lines.append(f"- training: {data['tokens_per_s']:,.0f} tokens/s (median of the logged steps after the first)")
    checkpoints = sorted((d / "run" / "checkpoints").glob("step_*")) if (d / "run" / "checkpoints").is_dir() else []
    if checkpoints:
        meta = read_json(checkpoints[-1] / "meta.json") or {}
        size = sum(f.stat().st_size for f in checkpoints[-1].rglob("*") if f.is_file())
        data["checkpoint"] = {"name": checkpoints[-1].name, "engine": meta.get("engine"),
                              "world_size": meta.get("world_size"), "bytes": size,
                              "precision": (meta.get("config") or {}).get("compute", {}).get("precision")}
        c = data["checkpoint"]
        lines.append(f"- checkpoint {c['name']}: engine {c['engine']}, {c['world_size']} rank(s), {c['precision']}, "
                     f"{size / 2**20:,.1f} MiB")
    else:
        lines.append("- no checkpoint written")
    ev = read_json(d / "eval.json")
    if ev and ev.get("results"):
        r = ev["results"][0]
        data["eval"] = r
        lines.append(f"- eval_ppl ({r['split']}, context {r['context']}): token perplexity "
                     f"{r['token_perplexity']:.2f}, word perplexity {r['word_perplexity']:.2f} over "
                     f"{r['num_tokens']:,} tokens, {r['num_tokens'] / max(r['seconds'], 1e-9):,.0f} tokens/s")
    else:
        lines.append("- eval_ppl: no result (wikitext/eval.json)")
    gen_log = "\n".join(log_tail(d / "generate.log", 50))
    rate = re.search(r"decode ([\d.]+) tokens/s", gen_log)
    if rate:
        text = (d / "generate.txt").read_text(errors="replace").strip().replace("\n", " ") if (
            d / "generate.txt").is_file() else ""
        data["generate"] = {"decode_tokens_per_s": float(rate.group(1)), "text": text[:300]}
        lines.append(f"- generate (greedy): {float(rate.group(1)):,.1f} tokens/s decoding; text: "
                     f"{json.dumps(text[:200], ensure_ascii=False)}")
    else:
        lines.append("- generate: no result (wikitext/generate.log)")
    return lines, data


def generate_section(out: Path, ceil: dict) -> tuple[list[str], dict]:
    data = read_json(out / "generate" / "generate.json")
    if not data:
        return ["No results (generate/generate.json is missing)."], {}
    rows = []
    for r in data["results"]:
        t, kind = bound(r.get("flops_per_token"), r.get("bytes_per_token"), ceil.get("fp32_tflops"),
                        ceil.get("copy_gbs"))
        r["bound_s"], r["limit"] = t, kind
        rows.append([r["model"], r["context"], num(r["tokens_per_second"], ",.1f"), num(r["speed_vs_reference"]),
                     num(r["cache_bytes"] / 2**20, ",.1f"),
                     num(r["device_bytes"] / 2**20, ",.0f") if r.get("device_bytes") is not None else None,
                     num(r["device_peak_bytes"] / 2**20, ",.0f") if r.get("device_peak_bytes") is not None else None,
                     num(t * 1e6 if t else None), f"{1 / r['tokens_per_second'] / t:.3g} ({kind})" if t else None])
    size = ", ".join(f"{k} {v}" for k, v in (data.get("size") or {}).items())
    note = (f"Batch 1, fp32, {size}; `x ref`: speed relative to {data['contexts'][0]} tokens, measured "
            f"alongside; `bound us`: one step's weights + decoding state read once (or its FLOPs) at the ceilings.")
    head = ["model", "context", "tok/s", "x ref", "cache MiB", "GPU MiB", "GPU peak MiB", "bound us", "x bound"]
    return [note, ""] + table(head, rows), data


def machine_lines(m: dict | None) -> list[str]:
    if not m:
        return ["No machine record (machine.json is missing)."]
    lines = [f"- date {m['date']}, host {m['host']}, lm {m['lm']}, Python {m['python']} ({m['executable']})"]
    if m.get("gpu"):
        g, c = m["gpu"], m["cuda"]
        lines.append(f"- GPU: {g['name']} x{g['count']}, {g['memory_gib']} GiB, {g['multiprocessors']} SMs, "
                     f"capability {g['capability']}, driver {g['driver']}; CUDA {c['runtime']}, cuDNN {c['cudnn']}, "
                     f"NCCL {c['nccl']}")
    else:
        lines.append(f"- CPU: {m['cpu']['cores']} cores, torch threads {m['cpu']['torch_threads']} (no GPU)")
    pk = ", ".join(f"{k} {v['version']}" + ("" if "site-packages" in v["from"] or "dist-packages" in v["from"]
                                            else f" (from {v['from']})") if v else f"{k} absent"
                   for k, v in m["packages"].items())
    lines.append(f"- packages: {pk}")
    c = m.get("ceilings") or {}
    if c:
        lines.append(f"- ceilings, measured: copy {c['copy_gbs']:,.0f} GB/s (read + written), bf16 matmul "
                     f"{c['bf16_tflops']:,.1f} TFLOP/s, fp32 matmul (TF32 off) {c['fp32_tflops']:,.1f} TFLOP/s "
                     f"({c['matmul_size']}^3)")
    return lines


def report(out: Path, mode: str) -> int:
    m = read_json(out / "machine.json")
    ceil = (m or {}).get("ceilings") or {}
    stages = stage_records(out)
    by_name = {s["stage"]: s for s in stages}
    md = ["# GPU check report", ""]
    if mode == "cpu":
        md += ["**CPU rehearsal** (`LM_GPU_CHECK_CPU=1`): every stage at tiny sizes on the CPU, to check the script "
               "and this report; its numbers say nothing about a GPU.", ""]
    md += [f"## {TITLES['machine']}", ""] + machine_lines(m) + ["", "## Stages", ""]
    md += table(["stage", "status", "seconds", "budget s", "why"],
                [[s["stage"], s["status"], s["seconds"], s["budget_s"], s["reason"] or None] for s in stages])
    sections = {"machine": m, "stages": stages}
    builders = {"tests": lambda: tests_section(out, "tests.log"), "attention": lambda: attention_section(out, ceil),
                "train": lambda: train_section(out, ceil), "wikitext": lambda: wikitext_section(out),
                "generate": lambda: generate_section(out, ceil)}
    for name, build in builders.items():
        md += ["", f"## {TITLES[name]}", ""]
        if by_name[name]["status"] == "not run":
            md.append(f"Not run: {by_name[name]['reason']}.")
            sections[name] = None
            continue
        if by_name[name]["status"] != "passed":
            md += [f"**{by_name[name]['status']}**: {by_name[name]['reason']}", ""]
        try:
            lines, data = build()
        except Exception as e:  # a result file of an unexpected shape must not cost the rest of the report
            lines, data = [f"The results of this stage could not be read: {type(e).__name__}: {e}"], {"error": str(e)}
        md += lines
        sections[name] = data
    failed = [s for s in stages if s["status"] in ("failed", "timed out")]
    md += ["", "## What failed", ""]
    if not failed:
        md.append("Nothing: every stage that ran passed.")
    for s in failed:
        md += [f"### {s['stage']}: {s['status']}", "", s["reason"], "", "```", *s["tail"], "```", ""]
    text = "\n".join(md).rstrip() + "\n"
    atomic_write_text(out / "gpu_report.md", text)
    atomic_write_text(out / "gpu_report.json", json.dumps({"mode": mode, **sections}, indent=1, default=str) + "\n")
    print(text)
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("machine", help="versions, the GPU and its measured ceilings -> OUT/machine.json")
    a.add_argument("out", type=Path)
    a.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    b = sub.add_parser("report", help="OUT/gpu_report.md and OUT/gpu_report.json from what the stages left")
    b.add_argument("out", type=Path)
    b.add_argument("--mode", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args(argv)
    if args.command == "machine":
        machine(args.out, args.device)
        return 0
    return report(args.out, args.mode)


if __name__ == "__main__":
    sys.exit(main())
