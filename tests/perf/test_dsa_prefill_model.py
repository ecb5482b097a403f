"""The sparse prefill on the timing model (pykernels/perf/dsa_prefill.py): its kernel sampled on
the emulator, extrapolated over the whole-token schedule of pykernels/cuda/dsa.py."""
import pytest

from pykernels.perf import dsa_prefill as PP


def test_prediction_runs_the_kernel_over_its_schedule():
    got = PP.predict(s_q=300, h_q=128, topk=256, lo=1, hi=2)
    assert got.grid == (66, 2) and got.busiest_tokens == 5            # 132 SMs / 2 head tiles; ceil(300 / 66)
    assert got.l2_hit == 0.5                                          # the two head tiles share a token's rows
    assert got.per_block_clk > 0 and got.token_clk > 0 and 0 < got.tflops < 989   # below H800's bf16 peak
    assert "model version" in got.lines()[0]


def test_h_q_outside_the_kernel_is_an_error():
    with pytest.raises(ValueError, match=r"h_q: the sparse prefill kernel needs a multiple of 64, got 96"):
        PP.predict(s_q=4, h_q=96, topk=64)
