"""DeepGEMM's SM90 FP8 1D2D GEMM (deep_gemm/impls/sm90_fp8_gemm_1d2d.cuh, from the
`sgl-deep-gemm` wheel) compiled by our own instantiation and launched on the emulator with
kernel parameters and tensor maps built here (docs/peers.md).

    compiled = compile_fp8_gemm(block_m=128, block_n=128, num_sms=2, cluster=2)
    stats = launch_fp8_gemm(compiled, a, sfa, b, sfb, out, schedule="cta_last")

out[m, n] = sum_kb sfa[m, kb] * sfb[n // 128, kb] * (A[m, kb-block] . B[n, kb-block]), bf16.
"""
import dataclasses
import math

import torch

from pykernels.runtime.hardware import SCALE_BLOCK, SMEM_PER_BLOCK, cdiv, round_up
from pykernels.runtime.tensormap import TensorMapDesc

from . import toolchain
from .checks import check_tensor, check_tma_rows
from .gemm_tiles import BARRIER_BYTES, GemmTiles, launch_gemm

BLOCK_K = 128                 # the kernel's only K block (static assert)
SWIZZLE_AB = 128              # a 128-element fp8 K row is one 128-byte swizzle row

_SOURCE = """// pykernels peer harness: one DeepGEMM SM90 FP8 1D2D GEMM instantiation.
#include <deep_gemm/impls/sm90_fp8_gemm_1d2d.cuh>

// Taking the kernel's address instantiates it for the template arguments below.
void* pk_peer_instantiate() {{
    return reinterpret_cast<void*>(&deep_gemm::sm90_fp8_gemm_1d2d_impl<{args}>);
}}
"""


@dataclasses.dataclass(frozen=True)
class Fp8GemmConfig(GemmTiles):
    """GemmTiles for the FP8 1D2D kernel: K blocks of 128; a tile may straddle at most two
    128-column B-scale blocks (block_n 8..128, 144, 160, 192, 256 ...)."""

    def __post_init__(self):
        if self.block_n > BLOCK_K and math.gcd(self.block_n, BLOCK_K) != self.block_n - BLOCK_K:
            raise ValueError(f"block_n: {self.block_n} would need more than two B scale blocks per tile")
        super().__post_init__()

    def shared_bytes(self, k: int) -> int:
        return shared_bytes(self.block_m, self.block_n, self.stages, k)

    def template_args(self) -> str:
        return ", ".join(str(x) for x in (
            "cute::UMMA::Major::K", self.shape_m, self.shape_n, self.shape_k, 1,
            self.block_m, self.block_n, BLOCK_K, SWIZZLE_AB, SWIZZLE_AB, self.swizzle_d,
            *self.tail_template_args(), "cutlass::bfloat16_t"))


def shared_bytes(block_m: int, block_n: int, stages: int, k: int) -> int:
    """Dynamic shared memory the kernel lays out for K = k: output tile, A/B stages,
    per-stage A scales (128-byte aligned), the tile's B scales, full/empty barriers."""
    sfb_rows = 1 if BLOCK_K % block_n == 0 else 2
    return (round_up(block_m * block_n * 2, 1024)
            + stages * (block_m + block_n) * BLOCK_K
            + stages * round_up(block_m * 4, 128)
            + round_up(cdiv(k, SCALE_BLOCK) * sfb_rows * 4, BARRIER_BYTES)
            + stages * 2 * BARRIER_BYTES)


def max_stages(block_m: int, block_n: int, k: int, limit: int = 8) -> int:
    """The deepest pipeline (at most `limit`) whose shared memory fits for K = k."""
    for stages in range(limit, 0, -1):
        if shared_bytes(block_m, block_n, stages, k) <= SMEM_PER_BLOCK:
            return stages
    raise ValueError(f"block {block_m}x{block_n}: not even one stage fits in shared memory")


@dataclasses.dataclass(frozen=True)
class CompiledFp8Gemm:
    config: Fp8GemmConfig
    ptx: toolchain.PeerPTX
    package: str       # "sgl-deep-gemm <version>"


def compile_fp8_gemm(block_m: int, block_n: int, *, num_sms: int, cluster: int = 1, multicast_on_a: bool = False,
                     stages: int = None, shape_m: int = 0, shape_n: int = 0, shape_k: int = 0) -> CompiledFp8Gemm:
    """Instantiate and compile (cached) DeepGEMM's sm90_fp8_gemm_1d2d_impl for one config.
    stages=None takes the deepest pipeline that fits (for K = shape_k, or 16384 when K is
    a run-time value). Raises toolchain.PeerMissing when the headers or nvcc are absent."""
    if stages is None:
        stages = max_stages(block_m, block_n, shape_k or 16384)
    cfg = Fp8GemmConfig(block_m, block_n, stages, num_sms, cluster, multicast_on_a, shape_m, shape_n, shape_k)
    headers = toolchain.deep_gemm_headers()
    ptx = toolchain.compile_to_ptx(_SOURCE.format(args=cfg.template_args()), headers)
    return CompiledFp8Gemm(cfg, ptx, f"{headers.dist} {headers.version}")


def sfa_tma_layout(sfa: torch.Tensor) -> torch.Tensor:
    """The A scales as DeepGEMM's kernel reads them by TMA: [ceil(k/128), m_pad] float32,
    m contiguous, m_pad = m rounded up to 4 (16 bytes). A column-major, TMA-aligned sfa
    (strides (1, m_pad)) is used in place; any other layout is copied into one."""
    m, kb = sfa.shape
    m_pad = round_up(m, 4)
    if sfa.stride() == (1, m_pad) and sfa.data_ptr() % 16 == 0 and \
            sfa.storage_offset() + kb * m_pad <= sfa.untyped_storage().nbytes() // 4:
        return sfa.as_strided((kb, m_pad), (m_pad, 1))
    buf = torch.zeros(kb, m_pad, dtype=torch.float32)
    buf[:, :m] = sfa.T
    return buf


def fp8_gemm_args(compiled: CompiledFp8Gemm, a, sfa, b, sfb, out) -> list:
    """The kernel's parameters in order: sfb pointer, grouped_layout (null for the normal
    GEMM), shape_m, shape_n, shape_k, then the A, B, D and A-scale tensor maps."""
    cfg = compiled.config
    m, k = a.shape[0], a.shape[-1]
    n = b.shape[0]
    kb = cdiv(k, SCALE_BLOCK)
    check_tensor("a", a, torch.float8_e4m3fn, (m, k))
    check_tensor("b", b, torch.float8_e4m3fn, (n, k))
    check_tensor("sfa", sfa, torch.float32, (m, kb))
    check_tensor("sfb", sfb, torch.float32, (cdiv(n, SCALE_BLOCK), kb))
    check_tensor("out", out, torch.bfloat16, (m, n))
    cfg.check_dims(m, n, k)
    if cfg.shared_bytes(k) > SMEM_PER_BLOCK:
        raise ValueError(f"a: K = {k} needs {cfg.shared_bytes(k)} bytes of shared memory with {cfg.stages} "
                         f"stages, more than {SMEM_PER_BLOCK}: compile with fewer stages")
    for name, t in (("a", a), ("b", b), ("out", out)):
        check_tma_rows(name, t)
    maps = [TensorMapDesc(a, (cfg.block_m, BLOCK_K), SWIZZLE_AB),
            TensorMapDesc(b, (cfg.block_n, BLOCK_K), SWIZZLE_AB),
            cfg.output_map(out),
            TensorMapDesc(sfa_tma_layout(sfa), (1, cfg.block_m), 0)]
    return [sfb.contiguous(), 0, m, n, k, *maps]


def launch_fp8_gemm(compiled: CompiledFp8Gemm, a, sfa, b, sfb, out, *, schedule="lockstep", **launch_options):
    """Run the compiled kernel on the emulator: out (bf16 [m, n]) <- A·Bᵀ with block scales.

    a: e4m3 [m, k]; sfa: f32 [m, ceil(k/128)] (any layout; see sfa_tma_layout);
    b: e4m3 [n, k], n a multiple of 8; sfb: f32 [ceil(n/128), ceil(k/128)]; all CPU.
    schedule and launch_options go to pykernels.emu.launch. Returns the emulator's Stats.
    """
    args = fp8_gemm_args(compiled, a, sfa, b, sfb, out)
    return launch_gemm(compiled, args, a.shape[-1], schedule, launch_options)
