"""MLA test problems shared by tests/test_mla.py and tests/test_mla_cuda.py."""
import torch

PAGE = 64


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
