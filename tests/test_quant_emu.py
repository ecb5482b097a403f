"""The hand-written PTX quantization kernels, run by the emulator through the same launch
plans the GPU uses: bit-identical to the reference (q bytes and scales), outputs poisoned."""
import pytest
import torch

import pykernels as pk
from pykernels import reference as R
from pykernels.cuda import quant as cq
from pykernels.runtime.executors import run_emu


def _poisoned(plan_fn, x, sf_shape):
    q = torch.full(x.shape, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn)   # NaN bytes
    sf = torch.full(sf_shape, float("nan"))
    stats = run_emu(plan_fn(x, q, sf))
    return q, sf, stats


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 128), (7, 200), (129, 384), (3, 1)])
def test_per_token_bits(shape, dtype, seed):
    x = (torch.randn(*shape) * 5).to(dtype)
    x[0, 0] = 0  # zeros inside a group are fine; a whole zero group is tested below
    q, sf, stats = _poisoned(cq.per_token_plan, x, (shape[0], -(-shape[1] // 128)))
    rq, rsf = R.per_token_cast_to_fp8(x)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(sf, rsf)
    assert stats.global_written == q.numel() + 4 * sf.numel()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(128, 128), (200, 300), (1, 129), (130, 7)])
def test_per_block_bits(shape, dtype, seed):
    x = (torch.randn(*shape) * 5).to(dtype)
    q, sf, stats = _poisoned(cq.per_block_plan, x, (-(-shape[0] // 128), -(-shape[1] // 128)))
    rq, rsf = R.per_block_cast_to_fp8(x)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(sf, rsf)
    assert stats.instructions["memory.shared"] > 0 and stats.instructions["sync"] > 0


def test_edges_zero_group_saturation_and_strides(seed):
    x = torch.randn(4, 512, dtype=torch.float32) * 100
    x[1, 128:256] = 0                                # all-zero group: floor scale 1e-4/448
    x[2, 0] = 1e30                                   # huge amax: everything else near zero
    wide = torch.randn(4, 700)
    wide[:, :512] = x
    view = wide[:, :512]                             # row stride 700, unit column stride
    for op in ("per_token_cast_to_fp8", "per_block_cast_to_fp8"):
        q, sf = getattr(pk, op)(view, backend="emu")
        rq, rsf = getattr(R, op)(view)
        assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(sf, rsf), op


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match=r"backend: expected one of .*'emu'.*got 'gpu'"):
        pk.per_token_cast_to_fp8(torch.randn(2, 128), backend="gpu")
