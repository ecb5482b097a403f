"""The emulator runs PTX that Triton compiled for sm_90a, against torch references.

This is the emulator's check against code we did not write: Triton's own wgmma
fragment layouts, shared-memory descriptors, swizzles, TMA and mbarrier use. Inputs
are fresh random values; outputs are poisoned (NaN) so unwritten elements fail.
"""
import functools

import pytest
import torch

triton = pytest.importorskip("triton")

from pykernels import emu  # noqa: E402

if not hasattr(emu, "launch_triton"):
    pytest.skip("pykernels.emu.launch_triton is not implemented yet (issue 3)", allow_module_level=True)
from pykernels.metrics import calc_diff, rel_error  # noqa: E402




@functools.lru_cache(maxsize=None)
def _compile(name, signature, constexprs, num_warps, num_stages=3):
    # Compiled in a child process: this one runs Triton's interpreter (no GPU here).
    return emu.compile_triton("tests.emu_triton.kernels", name, dict(signature), dict(constexprs),
                              num_warps=num_warps, num_stages=num_stages)




def _fp8(shape):
    return (torch.randn(shape) * 2).to(torch.float8_e4m3fn)


FP8_GEMM_SIG = (("a_ptr", "*fp8e4nv"), ("b_ptr", "*fp8e4nv"), ("c_ptr", "*bf16"),
                ("sfa_ptr", "*fp32"), ("sfb_ptr", "*fp32"), ("M", "i32"), ("N", "i32"),
                ("K", "i32"), ("stride_am", "i32"), ("stride_bn", "i32"), ("stride_cm", "i32"))


@pytest.mark.parametrize("block_m,block_n,num_warps,num_stages,m,n", [
    (64, 64, 4, 3, 100, 128),
    (128, 128, 8, 4, 129, 256),
    (128, 256, 8, 3, 128, 256),
    pytest.param(128, 128, 4, 3, 256, 256, marks=pytest.mark.slow),
])
def test_fp8_block_scaled_gemm(block_m, block_n, num_warps, num_stages, m, n):
    # wgmma e4m3 m64nNk32, two-level accumulation with per-row and per-block scales.
    k = 256
    kb = k // 128
    compiled = _compile("fp8_block_scaled_gemm", FP8_GEMM_SIG,
                        (("BLOCK_M", block_m), ("BLOCK_N", block_n), ("BLOCK_K", 128)),
                        num_warps, num_stages)
    a, b = _fp8((m, k)), _fp8((n, k))
    sfa = torch.rand(m, kb) + 0.5
    sfb = torch.rand(n // 128, kb) + 0.5
    c = torch.full((m, n), float("nan"), dtype=torch.bfloat16)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), 1)
    stats = emu.launch_triton(compiled, grid, a, b, c, sfa, sfb, m, n, k, k, k, n)
    ref = torch.zeros(m, n, dtype=torch.float64)
    for i in range(kb):
        ks = slice(i * 128, (i + 1) * 128)
        part = a[:, ks].double() @ b[:, ks].double().T
        ref += part * sfa[:, i:i + 1].double() * sfb[:, i].double().repeat_interleave(128)[None, :]
    assert not torch.isnan(c.float()).any(), "unwritten output elements"
    # products of e4m3 values are exact; only fp32 accumulation and bf16 rounding differ.
    assert calc_diff(c, ref) < 1e-5
    assert rel_error(c, ref) < 8e-3
    assert stats.wgmma_issued > 0


def test_bf16_gemm():
    m = n = 64
    k = 64
    compiled = _compile("bf16_gemm", (("a_ptr", "*bf16"), ("b_ptr", "*bf16"), ("c_ptr", "*fp32"),
                                      ("M", "i32"), ("N", "i32"), ("K", "i32")),
                        (("BLOCK_M", 64), ("BLOCK_N", 64), ("BLOCK_K", 32)), 4)
    a = torch.randn(m, k).bfloat16()
    b = torch.randn(k, n).bfloat16()
    c = torch.full((m, n), float("nan"))
    emu.launch_triton(compiled, (1, 1, 1), a, b, c, m, n, k)
    ref = a.double() @ b.double()
    assert calc_diff(c, ref) < 1e-7
    assert rel_error(c, ref) < 1e-5  # exact products, fp32 sums


def test_softmax():
    rows, cols = 6, 200
    compiled = _compile("softmax", (("x_ptr", "*fp32"), ("y_ptr", "*fp32"), ("n_cols", "i32"),
                                    ("stride", "i32")), (("BLOCK", 256),), 4)
    x = torch.randn(rows, cols) * 3
    y = torch.full_like(x, float("nan"))
    emu.launch_triton(compiled, (rows, 1, 1), x, y, cols, cols)
    # ex2.approx is within 2 ulp; div.full within 2 ulp.
    torch.testing.assert_close(y, torch.softmax(x, dim=1), rtol=1e-5, atol=1e-7)


def test_attention():
    seq_q, seq_k, d = 64, 128, 64
    compiled = _compile("attention", (("q_ptr", "*bf16"), ("k_ptr", "*bf16"), ("v_ptr", "*bf16"),
                                      ("o_ptr", "*fp32"), ("seq_k", "i32"), ("scale", "fp32")),
                        (("BLOCK_M", 64), ("BLOCK_N", 64), ("D", d)), 4)
    q, k, v = (torch.randn(s, d).bfloat16() for s in (seq_q, seq_k, seq_k))
    o = torch.full((seq_q, d), float("nan"))
    scale = d ** -0.5
    emu.launch_triton(compiled, (1, 1, 1), q, k, v, o, seq_k, scale)
    ref = torch.softmax((q.double() @ k.double().T) * scale, dim=1) @ v.double()
    # P is rounded to bf16 before the second product, as the kernel does.
    assert calc_diff(o, ref) < 1e-5
    assert rel_error(o, ref) < 1e-2


def test_tma_descriptor_gemm():
    from triton.tools.tensor_descriptor import TensorDescriptor
    m, n, k = 128, 64, 256
    sig = (("a_desc", "tensordesc<fp8e4nv[64, 128]>"), ("b_desc", "tensordesc<fp8e4nv[64, 128]>"),
           ("c_desc", "tensordesc<fp32[64, 64]>"), ("K", "i32"))
    compiled = _compile("tma_gemm", sig, (("BLOCK_M", 64), ("BLOCK_N", 64), ("BLOCK_K", 128)), 4)
    a, b = _fp8((m, k)), _fp8((n, k))
    c = torch.full((m, n), float("nan"))
    descs = [TensorDescriptor.from_tensor(a, [64, 128]), TensorDescriptor.from_tensor(b, [64, 128]),
             TensorDescriptor.from_tensor(c, [64, 64])]
    stats = emu.launch_triton(compiled, (m // 64, n // 64, 1), *descs, k)
    ref = a.double() @ b.double().T
    assert calc_diff(c, ref) < 1e-9
    assert rel_error(c, ref) < 1e-6
    assert stats.wgmma_issued > 0


def test_atomic_sum():
    n = 1000
    compiled = _compile("atomic_sum", (("x_ptr", "*fp32"), ("out_ptr", "*fp32"), ("n", "i32")),
                        (("BLOCK", 256),), 4)
    x = torch.rand(n) + 0.1
    out = torch.tensor([1.5])
    emu.launch_triton(compiled, (triton.cdiv(n, 256), 1, 1), x, out, n)
    assert abs(out.item() - (1.5 + x.double().sum().item())) < 1e-3
