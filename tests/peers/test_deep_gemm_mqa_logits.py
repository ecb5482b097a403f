"""DeepGEMM's SM90 FP8 MQA logits kernel (the DeepSeek-V3.2 indexer's scores over ragged
prefill windows) on the emulator against a torch reference, under every schedule, with
NaN-poisoned logits: every in-window element must be written and nothing outside.

Reference (cases.py): logits[i, j] = sum_h w[i, h] * relu(kv_scale[j] * q[i, h, :] . kv[j, :])
for ks[i] <= j < ke[i], stored compressed (row i, column j - ks[i]) as the kernel writes
it; calc_diff < 1e-9."""
import pytest
import torch

from bench.peers import mqa_logits as M

from .cases import prefill_windows, assert_mqa_logits_match_reference
from .conftest import SCHEDULES


# 16 heads x 128 dims, 4 queries per CTA step (wgmma N = 64), 128 keys per step (two math
# warpgroups); 2 persistent CTAs; 3 packed sequences (a query block spans two of them,
# the last block is partial); windows longer than one KV block.
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_mqa_logits_prefill_windows(schedule, deep_gemm_headers, seed):
    compiled = M.compile_mqa_logits(16, 128, block_q=4, block_kv=128, num_sms=2)
    ks, ke, seq_len_kv = prefill_windows([7, 3, 9], extra_kv=150)
    assert_mqa_logits_match_reference(compiled, ks, ke, seq_len_kv + (-seq_len_kv) % 4, schedule)


# 64 heads x 64 dims (64-byte swizzle), 2 queries per step, one math warpgroup (64 keys
# per step); random windows, some empty, some ending at seq_len_kv; few KV stages so the
# ring wraps.
@pytest.mark.parametrize("schedule", ["lockstep", "cta_last", "wg_first", "wg_last"])
def test_mqa_logits_random_windows(schedule, deep_gemm_headers, seed):
    compiled = M.compile_mqa_logits(64, 64, block_q=2, block_kv=64, q_stages=2, kv_stages=2, num_sms=2)
    seq_len, seq_len_kv = 9, 200
    ks = torch.randint(0, seq_len_kv, (seq_len,), dtype=torch.int32)
    ke = torch.minimum(ks + torch.randint(0, 160, (seq_len,), dtype=torch.int32),
                       torch.tensor(seq_len_kv, dtype=torch.int32))
    ks[0], ke[0] = 13, 13                                             # an empty window
    ks[1], ke[1] = 0, seq_len_kv                                      # every key
    assert_mqa_logits_match_reference(compiled, ks, ke, seq_len_kv, schedule)


# 64 heads x 128 dims, 2 queries per step (wgmma N = 128), 256 keys per step: four math
# warpgroups (a 640-thread CTA); two sequences with 300 cached keys each.
@pytest.mark.parametrize("schedule", ["lockstep", "wg_last"])
def test_mqa_logits_four_math_warpgroups(schedule, deep_gemm_headers, seed):
    compiled = M.compile_mqa_logits(64, 128, block_q=2, block_kv=256, num_sms=2)
    assert compiled.config.threads == 640
    ks, ke, seq_len_kv = prefill_windows([3, 4], extra_kv=300)
    assert_mqa_logits_match_reference(compiled, ks, ke, seq_len_kv + (-seq_len_kv) % 4, schedule)


def test_bad_inputs_name_the_argument(deep_gemm_headers):
    compiled = M.compile_mqa_logits(16, 128, block_q=4, block_kv=128, num_sms=2)
    q = torch.zeros(4, 16, 128, dtype=torch.float8_e4m3fn)
    kv = torch.zeros(64, 128, dtype=torch.float8_e4m3fn)
    sc, w = torch.ones(64), torch.ones(4, 16)
    ks, ke = torch.zeros(4, dtype=torch.int32), torch.full((4,), 64, dtype=torch.int32)
    logits = torch.zeros(4, 64)
    with pytest.raises(ValueError, match="ks/ke"):
        M.launch_mqa_logits(compiled, q, kv, sc, w, ks, ke + 1, logits)
    with pytest.raises(ValueError, match="logits"):
        M.launch_mqa_logits(compiled, q, kv, sc, w, ks, ke, logits[:, :32])
    with pytest.raises(ValueError, match="weights"):
        M.launch_mqa_logits(compiled, q, kv, sc, w[:, :8], ks, ke, logits)
    with pytest.raises(ValueError, match="block_q"):
        M.compile_mqa_logits(64, 128, block_q=8, num_sms=2)
