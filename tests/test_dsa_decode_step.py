"""One DeepSeek Sparse Attention decode step end to end through the public API: indexer
logits over the paged FP8 key cache -> top-k -> sparse MLA decode over the FP8 latent
cache, against dense MLA attention (reference.mla, which dequantizes the FP8 cache) over
exactly the selected tokens: for each query row a small cache holding only the selected
tokens' 656-byte rows (copied byte for byte), attended densely with causal=False. The whole
chain runs on the reference backend, on the Triton one (interpreted here) and on the
hand-written kernels (emulated here); the sizes are inside the CUDA kernels' limits (32
indexer heads of 128, h_q 64)."""
import math

import pytest
import torch

import pykernels as pk
import pykernels.dsa as D
import pykernels.mla as M
from pykernels.reference import mla as RM

NAN = float("nan")


def _selected_cache(c8: torch.Tensor, rows: list) -> torch.Tensor:
    """A FP8 cache [pages, 64, 1, 656] whose first len(rows) tokens are `rows` of c8."""
    flat = c8.reshape(-1, 656)
    pages = max(1, -(-len(rows) // 64))
    small = torch.zeros(pages * 64, 656, dtype=torch.uint8)
    if rows:
        small[:len(rows)] = flat[torch.tensor(rows)]
    return small.view(pages, 64, 1, 656)


@pytest.mark.parametrize("backend", ["reference", "triton", "emu"])
@pytest.mark.parametrize("next_n,topk", [(1, 48), (2, 16)])
def test_indexer_topk_sparse_decode_equals_dense_attention_over_the_selection(seed, next_n, topk, backend):
    b, h_idx, d_idx, h_q, pages, max_blocks = 3, 32, 128, 64, 10, 3
    table = torch.randperm(pages)[:b * max_blocks].int().view(b, max_blocks)
    lens = torch.tensor([170, 30, 1], dtype=torch.int32)            # longer and shorter than topk
    # indexer keys and latent cache share the page table (both paged by 64 tokens)
    index_cache = D.quantize_indexer_k_cache(torch.randn(pages, 64, 1, d_idx))
    c8 = M.quantize_kv_cache_fp8(torch.randn(pages, 64, 1, 576).bfloat16())
    q_idx = torch.randn(b, next_n, h_idx, d_idx).to(torch.float8_e4m3fn)
    w = torch.randn(b * next_n, h_idx).abs()
    max_len = max_blocks * 64
    meta = pk.get_paged_mqa_logits_metadata(lens, 64, 4)
    logits = pk.fp8_paged_mqa_logits(q_idx, index_cache, w, lens, table, meta, max_len, backend=backend,
                                     out=torch.full((b * next_n, max_len), NAN))
    indices = pk.paged_topk_indices(logits, topk, lens, table, backend=backend,
                                    out=torch.full((b, next_n, topk), -7, dtype=torch.int32))
    q = torch.randn(b, next_n, h_q, 576).bfloat16()
    sched, none = M.get_mla_metadata(lens, next_n * h_q, 1, h_q, True, topk)
    out, lse = M.flash_mla_with_kvcache(q, c8, table, lens, 512, sched, none, None, False, True, indices,
                                        backend=backend, out=torch.full((b, next_n, h_q, 512), NAN, dtype=torch.bfloat16),
                                        softmax_lse=torch.full((b, h_q, next_n), NAN))
    for i in range(b):
        for j in range(next_n):
            visible = max(0, int(lens[i]) - next_n + j + 1)
            rows = [t for t in indices[i, j].tolist() if t != -1]
            assert len(rows) == min(topk, visible) and len(set(rows)) == len(rows)
            # the chosen tokens are the row's best: no visible token outside scores higher
            pos = [int((table[i] == t // 64).nonzero()[0, 0]) * 64 + t % 64 for t in rows]
            assert all(p < visible for p in pos)
            row_logits = logits[i * next_n + j, :visible]
            left_out = [p for p in range(visible) if p not in pos]
            if pos and left_out:
                assert float(row_logits[pos].min()) >= float(row_logits[left_out].max()), (i, j)
            small = _selected_cache(c8, rows)
            want_o, want_l = RM.flash_mla_with_kvcache(
                q[i:i + 1, j:j + 1], small, torch.arange(small.shape[0], dtype=torch.int32)[None],
                torch.tensor([len(rows)], dtype=torch.int32), causal=False)
            want = want_o[0, 0].float()
            # Triton and the CUDA kernel round P (times the group scale) to bf16 for the P.V
            # MMA, as on the GPU: about one bf16 step of the row's largest output more
            atol = 1e-5 if backend == "reference" else 2 ** -9 * float(want.abs().max())
            assert torch.allclose(out[i, j].float(), want, rtol=2 ** -7, atol=atol), (i, j)
            if rows:
                assert torch.allclose(lse[i, :, j], want_l[0, :, 0], rtol=1e-5, atol=1e-5), (i, j)
            else:
                assert (lse[i, :, j] == math.inf).all() and (out[i, j] == 0).all()
