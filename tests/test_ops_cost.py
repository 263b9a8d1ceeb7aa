"""The GPU cost model (lm/ops/cost.py): its counts of the torch-kernel methods against an independent count, the
fused method's counts from its loops, FlashAttention-2's figure, and tools/bench_roofline.py's JSON."""
import json
import subprocess
import sys

import pytest
import torch

from lm.ops.cost import GPU, H100_SXM, Shape, cheapest, counted_cost, fa2_cost, fused_cost, method_cost

from conftest import REPO


@pytest.mark.parametrize("method, N, L, kernels, gigabytes", [
    ("fft", 2048, 2048, 263, 19.7), ("fft", 4096, 4096, 319, 39.5), ("band", 4096, 128, 140, 1.9)])
def test_counts_of_torch_methods_agree_with_an_independent_count(method, N, L, kernels, gigabytes):
    """Kernels and bytes of forward + backward (B=1, H=8, M=D=64, float32) as a dispatch mode on meta written apart
    from this one counted them before the fused method existed: within 5% / 10%."""
    c = counted_cost(method, Shape(1, 8, N, 64, 64, L))
    assert abs(c.kernels - kernels) <= 0.05 * kernels, c.kernels
    assert abs(c.bytes / 1e9 - gigabytes) <= 0.1 * gigabytes, c.bytes
    assert c.seconds >= c.bytes / H100_SXM.bandwidth


def test_fa2_is_its_flops_at_40_percent_of_bf16_peak():
    c = fa2_cost(2, 8, 4096, 64)
    assert c.flops == 7 * 2 * 8 * 4096 ** 2 * 64
    assert c.seconds == pytest.approx(c.flops / (0.4 * 989e12))


def test_fused_cost_scales_as_its_loops_say():
    general = [fused_cost(Shape(1, 8, n, 64, 64, n, torch.bfloat16)) for n in (4096, 8192)]
    clipped = [fused_cost(Shape(1, 8, n, 64, 64, 128, torch.bfloat16)) for n in (4096, 8192)]
    assert general[0].kernels == general[1].kernels and clipped[0].kernels == clipped[1].kernels
    assert 3.8 < general[1].flops / general[0].flops < 4.1  # N^2: (query, key) tiles under the diagonal
    assert 1.9 < clipped[1].flops / clipped[0].flops < 2.1  # N: a window of tiles per query block
    # at least what must cross memory: q, k, v, out, d out read or written, dq, dk, dv written (bfloat16)
    assert general[1].bytes >= 8 * 1 * 8 * 8192 * 64 * 2
    # general RPE does FlashAttention-2's matmuls and one more pass (8 instead of 7), on diagonal tiles too
    fa2 = fa2_cost(1, 8, 8192, 64)
    assert 8 / 7 <= general[1].flops / fa2.flops < 1.3
    # float32 matmuls run on float32 units unless TF32 is asked for
    s32 = Shape(1, 8, 8192, 64, 64, 8192, torch.float32)
    assert fused_cost(s32).seconds > 5 * fused_cost(s32, tf32=True).seconds > 5 * general[1].seconds / 2


def test_auto_picks_the_least_predicted_time_and_respects_the_gpu():
    s = Shape(1, 8, 8192, 64, 64, 8192, torch.float32)
    assert cheapest(8192, 8192, 8, 64, 64, torch.float32, fused=False) == min(
        ("dense", "band", "fft"), key=lambda m: method_cost(m, s).seconds)
    slow_memory = GPU(name="slow memory", bandwidth=1e9)  # a bandwidth-bound shape takes ~3,350x longer
    clipped = Shape(1, 8, 8192, 64, 64, 128, torch.bfloat16)
    assert fused_cost(clipped, slow_memory).seconds > 1000 * fused_cost(clipped).seconds
    assert cheapest(4096, None, 8, 64, 64, torch.bfloat16, documents=True) == "fused"
    assert cheapest(4096, 4096, 8, 64, 64, torch.float32, documents=True, fused=False) != "fft"


def test_bench_roofline_writes_its_table_and_json(tmp_path):
    out = tmp_path / "roof.json"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "bench_roofline.py"), "--json", str(out), "--n", "8192",
                        "--configs", str(REPO / "configs" / "wikitext103_long.yaml")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["gpu"]["bandwidth"] == 3.35e12
    rows = report["rows"]
    assert [(x["config"], x["kind"], x["context"]) for x in rows] == [
        ("configs/wikitext103_long.yaml", "clipped", 4096), (None, "general", 8192), (None, "clipped", 8192),
        (None, "none", 8192)]
    for x in rows:
        assert set(x) >= {"config", "kind", "context", "method", "kernels", "bytes", "flops", "predicted_ms",
                          "fa2_predicted_ms"}
        assert x["method"] == "fused" and x["fa2_predicted_ms"] == pytest.approx(
            fa2_cost(x["batch"], x["heads"], x["context"], x["head_dim"]).ms)
    assert all(g["met"] for g in report["goals"]), report["goals"]
    # before the fused method: the previous crossovers (band for clipped RPE, fft for general RPE at 8k)
    assert [x["before_method"] for x in rows] == ["band", "fft", "band", "prefix"]
    assert all(x["before_predicted_ms"] > x["predicted_ms"] for x in rows)
    assert "| configs/wikitext103_long.yaml | clipped 129 | 4,096 |" in r.stdout


def test_counting_runs_apart_from_the_callers_modes():
    """auto on a GPU counts on first use, wherever it is called from: under no_grad, inference mode or a dispatch
    mode of the caller's, which must see none of the count's kernels."""
    from torch.utils.flop_counter import FlopCounterMode
    counted_cost.cache_clear()
    with torch.inference_mode():
        a = counted_cost("band", Shape(1, 2, 300, 8, 8, 20))
    counted_cost.cache_clear()
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        b = counted_cost("band", Shape(1, 2, 300, 8, 8, 20))
    assert a == b and a.kernels > 10 and flops.get_total_flops() == 0
