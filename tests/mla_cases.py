"""MLA test problems, poisoned outputs and the decode's check against the reference, shared
by the MLA (and sparse decode) tests; the poisoned split scratch is conftest's fixture."""
import torch

from pykernels.metrics import calc_diff

PAGE = 64
OUT_CALC_DIFF = 1e-5   # per-sequence calc_diff(out) of a decode against the reference
LSE_ABS = 1e-4         # max abs error of its finite LSE entries


def cdiv(a, b):
    return -(-a // b)


def make_problem(seqlens, s_q, h_q, spare_pages=3, h_kv=1):
    """Random q bf16 [b, s_q, h_q, 576] and a paged bf16 cache [num_blocks, 64, h_kv, 576]
    whose pages are a random permutation; pages not in use, table entries not in use (-1)
    and cache slots past each seqlen are poison (NaN). Returns q, cache, block_table int32
    [b, max_blocks], cache_seqlens int32 [b]."""
    b = len(seqlens)
    nblk = [cdiv(L, PAGE) for L in seqlens]
    max_blocks = max(nblk + [1]) + 1
    num_blocks = sum(nblk) + spare_pages
    cache = torch.randn(num_blocks, PAGE, h_kv, 576).to(torch.bfloat16)
    perm = torch.randperm(num_blocks)
    table = torch.full((b, max_blocks), -1, dtype=torch.int32)
    used = torch.zeros(num_blocks, dtype=torch.bool)
    off = 0
    for i, (L, n) in enumerate(zip(seqlens, nblk)):
        pages = perm[off:off + n]
        off += n
        table[i, :n] = pages.int()
        used[pages] = True
        if L % PAGE:
            cache[pages[-1], L % PAGE:] = float("nan")
    cache[~used] = float("nan")
    q = torch.randn(b, s_q, h_q, 576).to(torch.bfloat16)
    return q, cache, table, torch.tensor(seqlens, dtype=torch.int32)


def poisoned(b, s_q, h_q, strided=False):
    """NaN out bf16 [b, s_q, h_q, 512] and lse float32 [b, h_q, s_q]; strided: as permuted views
    (heads outermost in out, tokens before heads in lse), so each KV head's slice has odd strides."""
    if strided:
        return (torch.full((b, h_q, s_q, 512), float("nan"), dtype=torch.bfloat16).transpose(1, 2),
                torch.full((b, s_q, h_q), float("nan")).transpose(1, 2))
    return (torch.full((b, s_q, h_q, 512), float("nan"), dtype=torch.bfloat16),
            torch.full((b, h_q, s_q), float("nan")))


def check_decode(out, lse, ref, ref_lse):
    """A decode's out [b, s_q, h_q, 512] and lse [b, h_q, s_q] against the reference's: nothing
    left NaN, the same +inf rows (out 0 there), LSE within LSE_ABS, calc_diff(out) within
    OUT_CALC_DIFF per sequence with a visible key."""
    assert not out.isnan().any(), "out elements left unwritten (or NaN produced)"
    assert not lse.isnan().any(), "lse elements left unwritten"
    assert torch.equal(lse.isinf(), ref_lse.isinf())
    assert (lse[lse.isinf()] > 0).all()
    empty = ref_lse.isinf().transpose(1, 2)               # [b, s_q, h_q]
    assert (out[empty] == 0).all(), "rows with no visible key must be 0"
    fin = ref_lse.isfinite()
    if fin.any():
        assert (lse[fin] - ref_lse[fin]).abs().max() < LSE_ABS
    for i in range(out.shape[0]):
        if fin[i].any():
            assert calc_diff(out[i], ref[i]) < OUT_CALC_DIFF, f"sequence {i}"
