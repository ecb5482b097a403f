"""Triton kernels compiled to sm_90a PTX and run by the emulator (code we did not write
the PTX for: it pins wgmma fragments, descriptors, swizzles and TMA to NVIDIA-targeted code).

Each kernel is defined as a plain Python function and wrapped in a compilable
JITFunction explicitly, so TRITON_INTERPRET=1 elsewhere in the process does not turn
them into interpreted functions.
"""
import triton.language as tl
from triton.runtime.jit import JITFunction


def _jit(fn):
    return JITFunction(fn)


def fp8_block_scaled_gemm(a_ptr, b_ptr, c_ptr, sfa_ptr, sfb_ptr, M, N, K,
                          stride_am, stride_bn, stride_cm,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[M, N] (bf16) = (A[M, K] e4m3 * sfa[M, K/128]) @ (B[N, K] e4m3 * sfb[N/128, K/128]).T"""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    kb = K // BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, kb):
        a = tl.load(a_ptr + rm[:, None] * stride_am + (k * BLOCK_K + rk)[None, :], mask=rm[:, None] < M, other=0.0)
        b = tl.load(b_ptr + rn[:, None] * stride_bn + (k * BLOCK_K + rk)[None, :], mask=rn[:, None] < N, other=0.0)
        sa = tl.load(sfa_ptr + rm * kb + k, mask=rm < M, other=0.0)
        sb = tl.load(sfb_ptr + (rn // 128) * kb + k, mask=rn < N, other=0.0)   # one per 128 columns
        part = tl.dot(a, tl.trans(b))
        acc += part * sa[:, None] * sb[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(tl.bfloat16), mask=mask)


def bf16_gemm(a_ptr, b_ptr, c_ptr, M, N, K,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[M, N] f32 = A[M, K] bf16 @ B[K, N] bf16 (row-major, M, N, K multiples of the blocks)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * N + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)


def softmax(x_ptr, y_ptr, n_cols, stride, BLOCK: tl.constexpr):
    """Row softmax of x [rows, n_cols] f32, one program per row."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride + cols, mask=cols < n_cols, other=-float("inf"))
    x = x - tl.max(x, axis=0)
    e = tl.exp(x)
    tl.store(y_ptr + row * stride + cols, e / tl.sum(e, axis=0), mask=cols < n_cols)


def attention(q_ptr, k_ptr, v_ptr, o_ptr, seq_k, scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """o[BLOCK_M*grid, D] = softmax(q k^T * scale) v with online softmax; q,k,v bf16, o f32."""
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, D)
    q = tl.load(q_ptr + rm[:, None] * D + rd[None, :])
    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for start in range(0, seq_k, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + rn[:, None] * D + rd[None, :])
        v = tl.load(v_ptr + rn[:, None] * D + rd[None, :])
        s = tl.dot(q, tl.trans(k)) * scale
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), v)
        m_i = m_new
    tl.store(o_ptr + rm[:, None] * D + rd[None, :], acc / l_i[:, None])


def tma_gemm(a_desc, b_desc, c_desc, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[M, N] f32 = A[M, K] fp8 @ B[N, K]^T through host-side tensor descriptors (TMA)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = a_desc.load([pid_m * BLOCK_M, k])
        b = b_desc.load([pid_n * BLOCK_N, k])
        acc = tl.dot(a, b.T, acc)
    c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc)


def atomic_sum(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out[0] += sum(x[block]) per program, with an atomic add."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.atomic_add(out_ptr, tl.sum(x, axis=0))


KERNELS = {name: _jit(fn) for name, fn in [
    ("fp8_block_scaled_gemm", fp8_block_scaled_gemm), ("bf16_gemm", bf16_gemm),
    ("softmax", softmax), ("attention", attention), ("tma_gemm", tma_gemm),
    ("atomic_sum", atomic_sum)]}
