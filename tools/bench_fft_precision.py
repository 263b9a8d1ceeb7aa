#!/usr/bin/env python
"""Accuracy of the FFT method's far field in float32 and float64 over RPE bias families: the evidence behind the
float32/float64 policy (lm.ops.precision).

    python tools/bench_fft_precision.py                      # N = 4096 and 16384, every family
    python tools/bench_fft_precision.py --n 65536 --families init decay_0.5log rising_1 --rows 400

For each family and length: the policy's ``risk``, the dtype the policy picks (what the model runs), and the worst
per-position relative error of the op (method fft) with the far field in float32 and in float64, against the
float64 dense reference on sampled rows (the first --rows, the last 100, and --rows random ones); ``err/(eps
risk)`` is the float32 error in units of float32 eps times risk (the policy assumes it stays below 1). Inputs:
B=1, H=2, uniform features (M=16), Gaussian values (D=8). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lm.fileio import atomic_write_text
from lm.ops import kernelized_attention
from lm.ops.precision import FP32_MAX_RISK, far_field_risk, fp32_max_lengths
from lm.ops.reference import BIAS_FAMILIES, bias_family, kernelized_attention_reference_rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--families", nargs="+", default=list(BIAS_FAMILIES), choices=BIAS_FAMILIES)
    p.add_argument("--rows", type=int, default=600, help="leading rows checked (and as many random ones)")
    p.add_argument("--features", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=8)
    p.add_argument("--json", type=Path, default=Path("bench_results/fft_precision.json"))
    args = p.parse_args(argv)
    eps = torch.finfo(torch.float32).eps
    print(f"FP32_MAX_RISK = {FP32_MAX_RISK:g}; worst per-position relative error vs float64, M={args.features} "
          f"D={args.head_dim}")
    print(f"{'N':>6} {'family':<14} {'span':>6} {'risk':>9} {'policy':>7} {'fp32 err':>9} {'fp64 err':>9} "
          f"{'err/(eps risk)':>14}")
    rows_out = []
    for n in args.n:
        g = torch.Generator().manual_seed(0)
        q, k = torch.rand(1, 2, n, args.features, generator=g), torch.rand(1, 2, n, args.features, generator=g)
        v = torch.randn(1, 2, n, args.head_dim, generator=g)
        head = min(args.rows, n)
        rows = torch.arange(head)
        if n > head + 100:
            rows = torch.cat([rows, torch.arange(n - 100, n),
                              torch.randint(head, n - 100, (args.rows,), generator=torch.Generator().manual_seed(2))])
        for family in args.families:
            bias = bias_family(family, n)
            risk = far_field_risk(bias, [n]).item()
            policy = "fp32" if n <= fp32_max_lengths([bias])[0] else "fp64"
            ref = kernelized_attention_reference_rows(q, k, v, bias, rows)
            err = {}
            for name, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
                out = kernelized_attention(q, k, v, bias, method="fft", fft_dtype=dtype)[:, :, rows]
                err[name] = ((out.double() - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
            ratio = err["fp32"] / (eps * risk) if risk > 0 else float("nan")
            span = (bias.max() - bias.min()).item()
            print(f"{n:>6} {family:<14} {span:>6.1f} {risk:>9.3g} {policy:>7} {err['fp32']:>9.1e} "
                  f"{err['fp64']:>9.1e} {ratio:>14.2f}", flush=True)
            rows_out.append(dict(n=n, family=family, span=span, risk=risk, policy=policy, err_fp32=err["fp32"],
                                 err_fp64=err["fp64"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps({"fp32_max_risk": FP32_MAX_RISK, "rows": rows_out}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
