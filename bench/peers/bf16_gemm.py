"""DeepGEMM's SM90 BF16 GEMM (deep_gemm/impls/sm90_bf16_gemm.cuh, NT: A and B K-major,
bf16 out without accumulation) compiled by our instantiation and launched on the emulator
with tensor maps built here (docs/peers.md).

    compiled = compile_bf16_gemm(block_m=128, block_n=128, num_sms=2)
    stats = launch_bf16_gemm(compiled, a, b, out)      # out = a @ b.T
"""
import dataclasses

import torch

from pykernels.runtime.hardware import SMEM_PER_BLOCK, round_up
from pykernels.runtime.tensormap import TensorMapDesc

from . import toolchain
from .checks import check_tensor, check_tma_rows
from .gemm_tiles import BARRIER_BYTES, GemmTiles, launch_gemm

BLOCK_K = 64                  # 64 bf16 = one 128-byte swizzle row (DeepGEMM's SM90 BF16 choice)
SWIZZLE_AB = 128

_SOURCE = """// pykernels peer harness: one DeepGEMM SM90 BF16 GEMM instantiation.
#include <deep_gemm/impls/sm90_bf16_gemm.cuh>

// Taking the kernel's address instantiates it for the template arguments below.
void* pk_peer_instantiate() {{
    return reinterpret_cast<void*>(&deep_gemm::sm90_bf16_gemm_impl<{args}>);
}}
"""


def shared_bytes(block_m: int, block_n: int, stages: int) -> int:
    """Output tile (1024-aligned), A/B stages, full/empty barriers."""
    return (round_up(block_m * block_n * 2, 1024) + stages * (block_m + block_n) * BLOCK_K * 2
            + stages * 2 * BARRIER_BYTES)


@dataclasses.dataclass(frozen=True)
class Bf16GemmConfig(GemmTiles):
    """GemmTiles for the BF16 kernel (K blocks of 64; stages < 10 so that the kernel does
    not merge stages into longer K blocks)."""

    def __post_init__(self):
        if self.kind != "normal":
            raise ValueError(f"kind: only the normal BF16 GEMM is wired here, got {self.kind!r}")
        if self.stages >= 10:
            raise ValueError(f"stages: expected fewer than 10 (the kernel merges 10 or more), got {self.stages}")
        super().__post_init__()

    def shared_bytes(self, k: int = 0) -> int:
        return shared_bytes(self.block_m, self.block_n, self.stages)

    def template_args(self) -> str:
        return ", ".join(str(x) for x in (
            "cute::UMMA::Major::K", "cute::UMMA::Major::K", self.shape_m, self.shape_n, self.shape_k, 1,
            self.block_m, self.block_n, BLOCK_K, SWIZZLE_AB, SWIZZLE_AB, self.swizzle_d,
            *self.tail_template_args(), "false", "cutlass::bfloat16_t"))


@dataclasses.dataclass(frozen=True)
class CompiledBf16Gemm:
    config: Bf16GemmConfig
    ptx: toolchain.PeerPTX
    package: str


def compile_bf16_gemm(block_m: int, block_n: int, *, num_sms: int, cluster: int = 1, multicast_on_a: bool = False,
                      stages: int = None, shape_m: int = 0, shape_n: int = 0, shape_k: int = 0) -> CompiledBf16Gemm:
    """Instantiate and compile (cached) DeepGEMM's sm90_bf16_gemm_impl for one config;
    stages=None takes the deepest pipeline (at most 8) that fits."""
    if stages is None:
        stages = next(s for s in range(8, 0, -1) if shared_bytes(block_m, block_n, s) <= SMEM_PER_BLOCK)
    cfg = Bf16GemmConfig(block_m, block_n, stages, num_sms, cluster, multicast_on_a, shape_m, shape_n, shape_k)
    headers = toolchain.deep_gemm_headers()
    ptx = toolchain.compile_to_ptx(_SOURCE.format(args=cfg.template_args()), headers)
    return CompiledBf16Gemm(cfg, ptx, f"{headers.dist} {headers.version}")


def bf16_gemm_args(compiled: CompiledBf16Gemm, a, b, out) -> list:
    """The kernel's parameters in order: grouped_layout (null), shape_m, shape_n, shape_k,
    then the A, B and D tensor maps."""
    cfg = compiled.config
    m, k = a.shape[0], a.shape[-1]
    n = b.shape[0]
    check_tensor("a", a, torch.bfloat16, (m, k))
    check_tensor("b", b, torch.bfloat16, (n, k))
    check_tensor("out", out, torch.bfloat16, (m, n))
    cfg.check_dims(m, n, k)
    for name, t in (("a", a), ("b", b), ("out", out)):
        check_tma_rows(name, t)
    return [0, m, n, k,
            TensorMapDesc(a, (cfg.block_m, BLOCK_K), SWIZZLE_AB),
            TensorMapDesc(b, (cfg.block_n, BLOCK_K), SWIZZLE_AB),
            cfg.output_map(out)]


def launch_bf16_gemm(compiled: CompiledBf16Gemm, a, b, out, *, schedule="lockstep", **launch_options):
    """Run the compiled kernel on the emulator: out (bf16 [m, n]) <- a (bf16 [m, k]) ·
    b (bf16 [n, k])ᵀ, n a multiple of 8, rows 16-byte aligned. Returns the emulator's Stats."""
    args = bf16_gemm_args(compiled, a, b, out)
    return launch_gemm(compiled, args, a.shape[-1], schedule, launch_options)
