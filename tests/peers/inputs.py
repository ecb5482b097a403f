"""Random FP8 operands for the peer tests, quantized by pykernels.reference."""
import torch

from pykernels import reference as R


def spread(rows, cols, row_block):
    """randn [rows, cols] times 2^e, e uniform in [-4, 4] per (row_block x 128) block, so
    every scale factor differs and using a wrong one shows far above the tolerance."""
    e = torch.randint(-4, 5, (-(-rows // row_block), -(-cols // 128))).float()
    f = torch.exp2(e).repeat_interleave(row_block, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    return (torch.randn(rows, cols) * f).to(torch.bfloat16)


def fp8_gemm_problem(m, n, k):
    """a e4m3 [m, k] with 1x128 scales sfa [m, k/128]; b e4m3 [n, k] with 128x128 scales."""
    a, sfa = R.per_token_cast_to_fp8(spread(m, k, 1))
    b, sfb = R.per_block_cast_to_fp8(spread(n, k, 128))
    return a, sfa, b, sfb
