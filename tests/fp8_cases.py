"""Shared builders of FP8 GEMM test problems (fresh random data every call)."""
import torch

from pykernels import reference as R


def quantized_weights(groups, n, k):
    """b e4m3 [G, n, k] and sfb f32 [G, ceil(n/128), k/128] from random bf16 weights."""
    pairs = [R.per_block_cast_to_fp8(torch.randn(n, k, dtype=torch.bfloat16)) for _ in range(groups)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def normal_problem(m, n, k):
    x = torch.randn(m, k, dtype=torch.bfloat16)
    y = torch.randn(n, k, dtype=torch.bfloat16)
    a, sfa = R.per_token_cast_to_fp8(x)
    b, sfb = R.per_block_cast_to_fp8(y)
    return x, y, a, sfa, b, sfb


def contiguous_indices(group_rows, pad_to=128):
    """m_indices for groups of the given row counts, each segment padded with -1 rows to a
    multiple of pad_to (empty groups get no segment)."""
    idx = []
    for g, rows in enumerate(group_rows):
        seg = -(-rows // pad_to) * pad_to
        idx += [g] * rows + [-1] * (seg - rows)
    return torch.tensor(idx, dtype=torch.int32)


def nan_bf16(*shape):
    """Poisoned output buffer: any element a kernel fails to write stays NaN."""
    return torch.full(shape, float("nan"), dtype=torch.bfloat16)
