"""The op's CPU thread policy is an explicit setting (cpu_threads / lm.ops.CPUThreads) and leaves torch's thread
settings as it found them."""
import threading

import pytest
import torch

from lm.ops import CPUThreads, kernelized_attention

from conftest import op_inputs


def thread_count_seen_by_a_new_thread() -> int:
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    return seen[0]


@pytest.mark.parametrize("method", ["fft", "band"])
def test_every_thread_setting_gives_the_same_result_and_leaves_settings_alone(method):
    q, k, v = op_inputs(2, 3, 300, 4, 5, dtype=torch.float32)
    bias = torch.randn(3, 300 if method == "fft" else 40)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        new_thread_before = thread_count_seen_by_a_new_thread()
        results = [kernelized_attention(q, k, v, bias, method=method, fft_dtype=torch.float32, cpu_threads=t)
                   for t in (0, 1, 2, 3, 6)]
        assert torch.get_num_threads() == 2
        assert thread_count_seen_by_a_new_thread() == new_thread_before
    finally:
        torch.set_num_threads(before)
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-6, atol=1e-6)


def test_thread_setting_resolution_and_errors():
    assert CPUThreads(3).resolve(items=8) == 3
    assert CPUThreads(3).resolve(items=2) == 2
    assert CPUThreads(0).resolve(items=100) == torch.get_num_threads()
    with pytest.raises(ValueError, match=r"cpu_threads=-1"):
        kernelized_attention(*op_inputs(1, 1, 10, 2, 2), cpu_threads=-1)
    with pytest.raises(ValueError, match=r"fft_dtype=torch.float16"):
        kernelized_attention(*op_inputs(1, 1, 10, 2, 2), fft_dtype=torch.float16)
