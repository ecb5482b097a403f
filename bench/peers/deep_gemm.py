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
            "cute::UMMA::Major::K", self.shape_m, self.shape_n, self.shape_k, self.num_groups,
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
                     stages: int = None, shape_m: int = 0, shape_n: int = 0, shape_k: int = 0, kind: str = "normal",
                     num_groups: int = 1) -> CompiledFp8Gemm:
    """Instantiate and compile (cached) DeepGEMM's sm90_fp8_gemm_1d2d_impl for one config
    (kind "normal", or M-grouped "contiguous" / "masked" over num_groups groups).
    stages=None takes the deepest pipeline that fits (for K = shape_k, or 16384 when K is
    a run-time value). Raises toolchain.PeerMissing when the headers or nvcc are absent."""
    if stages is None:
        stages = max_stages(block_m, block_n, shape_k or 16384)
    cfg = Fp8GemmConfig(block_m, block_n, stages, num_sms, cluster, multicast_on_a, shape_m, shape_n, shape_k,
                        kind, num_groups)
    headers = toolchain.deep_gemm_headers()
    ptx = toolchain.compile_to_ptx(_SOURCE.format(args=cfg.template_args()), headers)
    return CompiledFp8Gemm(cfg, ptx, f"{headers.dist} {headers.version}")


def sfa_tma_layout(sfa: torch.Tensor) -> torch.Tensor:
    """The A scales as DeepGEMM's kernel reads them by TMA: [G·ceil(k/128), m_pad] float32
    (G = 1 for [m, kb]; sfa [G, m, kb] for the masked layout), m contiguous, m_pad = m
    rounded up to 4 (16 bytes). A column-major, TMA-aligned sfa (strides (1, m_pad), or
    (kb·m_pad, 1, m_pad)) is used in place; any other layout is copied into one."""
    lead, (m, kb) = sfa.shape[:-2], sfa.shape[-2:]
    groups = int(torch.Size(lead).numel())
    m_pad = round_up(m, 4)
    aligned = sfa.stride()[-2:] == (1, m_pad) and (not lead or sfa.stride(0) == kb * m_pad)
    if aligned and sfa.data_ptr() % 16 == 0 and \
            sfa.storage_offset() + groups * kb * m_pad <= sfa.untyped_storage().nbytes() // 4:
        return sfa.as_strided((groups * kb, m_pad), (m_pad, 1))
    buf = torch.zeros(groups, kb, m_pad, dtype=torch.float32, device=sfa.device)
    buf[:, :, :m] = sfa.reshape(groups, m, kb).transpose(1, 2)
    return buf.view(groups * kb, m_pad)


def _grouped_layout(cfg, grouped_layout, m: int, groups: int, device):
    """The int32 pointer argument: null (normal), m_indices [m_sum] (contiguous: one group
    or -1 per BLOCK_M rows), masked_m [G] (masked: 0 <= masked_m <= m_max)."""
    if cfg.kind == "normal":
        if grouped_layout is not None:
            raise ValueError("grouped_layout: the normal GEMM takes none")
        return 0
    want = (m,) if cfg.kind == "contiguous" else (groups,)
    check_tensor("grouped_layout", grouped_layout, torch.int32, want, device)
    if cfg.kind == "masked":
        if bool(((grouped_layout < 0) | (grouped_layout > m)).any()):
            raise ValueError(f"grouped_layout: masked_m must lie in [0, m_max = {m}], got {grouped_layout.tolist()}")
        return grouped_layout
    # the kernel takes a block's group from its first row and skips a 64-row slab whose
    # first row is -1: each block is rows of one group followed by padding
    blocks = grouped_layout.view(-1, cfg.block_m)
    owned = blocks >= 0
    one_group = ((blocks == blocks[:, :1]) | ~owned).all()
    prefix = not bool((owned[:, 1:] & ~owned[:, :-1]).any())
    if bool((blocks >= groups).any()) or bool((blocks < -1).any()) or not bool(one_group) or not prefix:
        raise ValueError(f"grouped_layout: each block of {cfg.block_m} rows must be rows of one group in "
                         f"[0, {groups}) followed by padding rows (-1)")
    return grouped_layout


def fp8_gemm_args(compiled: CompiledFp8Gemm, a, sfa, b, sfb, out, grouped_layout=None, device="cpu") -> list:
    """The kernel's parameters in order: sfb pointer, grouped_layout (int32 pointer, null
    for the normal GEMM), shape_m, shape_n, shape_k, then the A, B, D and A-scale tensor
    maps. Grouped operands are viewed as 2-D ([G·n, k] for B, [G·m_max, ...] for masked A
    and D): the kernel offsets rows by group itself. All tensors on `device` (the CPU for
    the emulator; a GPU for bench/peers/gpu_gemm.py)."""
    cfg = compiled.config
    grouped_b = cfg.kind != "normal"
    groups = b.shape[0] if grouped_b and b.dim() == 3 else 1
    n, k = b.shape[-2], b.shape[-1]
    lead = (groups,) if cfg.kind == "masked" else ()
    m = a.shape[-2]
    kb = cdiv(k, SCALE_BLOCK)
    check_tensor("a", a, torch.float8_e4m3fn, (*lead, m, k), device)
    check_tensor("sfa", sfa, torch.float32, (*lead, m, kb), device)
    lead_b = (groups,) if grouped_b else ()
    check_tensor("b", b, torch.float8_e4m3fn, (*lead_b, n, k), device)
    check_tensor("sfb", sfb, torch.float32, (*lead_b, cdiv(n, SCALE_BLOCK), kb), device)
    check_tensor("out", out, torch.bfloat16, (*lead, m, n), device)
    if groups != cfg.num_groups:
        raise ValueError(f"b: the kernel was compiled for {cfg.num_groups} groups, got {groups}")
    cfg.check_dims(m, n, k)
    if cfg.kind != "normal" and m % cfg.block_m:
        raise ValueError(f"a: grouped layouts need rows (m_sum or m_max) in whole blocks of {cfg.block_m} "
                         f"(the kernel reads the layout and stores whole blocks), got {m}")
    if cfg.kind == "contiguous" and cfg.cluster == 2 and not cfg.multicast_on_a and m % (2 * cfg.block_m):
        raise ValueError(f"a: B multicast over a contiguous layout reads the peer block's group: m_sum must be a "
                         f"multiple of {2 * cfg.block_m}, got {m}")
    if cfg.shared_bytes(k) > SMEM_PER_BLOCK:
        raise ValueError(f"a: K = {k} needs {cfg.shared_bytes(k)} bytes of shared memory with {cfg.stages} "
                         f"stages, more than {SMEM_PER_BLOCK}: compile with fewer stages")
    layout = _grouped_layout(cfg, grouped_layout, m, groups, device)
    a2, b2, out2 = a.reshape(-1, k), b.reshape(-1, k), out.reshape(-1, n)
    if out2.data_ptr() != out.data_ptr() or (out.dim() == 3 and not out.is_contiguous()):
        raise ValueError("out: a masked output must be a contiguous [G, m_max, n] tensor")
    for name, t in (("a", a2), ("b", b2), ("out", out2)):
        check_tma_rows(name, t)
    maps = [TensorMapDesc(a2, (cfg.block_m, BLOCK_K), SWIZZLE_AB),
            TensorMapDesc(b2, (cfg.block_n, BLOCK_K), SWIZZLE_AB),
            cfg.output_map(out2),
            TensorMapDesc(sfa_tma_layout(sfa), (1, cfg.block_m), 0)]
    return [sfb.contiguous(), layout, m, n, k, *maps]


def launch_fp8_gemm(compiled: CompiledFp8Gemm, a, sfa, b, sfb, out, grouped_layout=None, *, schedule="lockstep",
                    **launch_options):
    """Run the compiled kernel on the emulator: out (bf16) <- A·Bᵀ with block scales.

    normal: a e4m3 [m, k], sfa f32 [m, ceil(k/128)] (any layout; see sfa_tma_layout),
    b e4m3 [n, k] (n a multiple of 8), sfb f32 [ceil(n/128), ceil(k/128)], out [m, n].
    contiguous: a [m_sum, k], sfa [m_sum, kb], b [G, n, k], sfb [G, n/128, kb], out
    [m_sum, n], grouped_layout = m_indices int32 [m_sum] (each BLOCK_M rows one group or
    -1; DeepGEMM writes the -1 rows too). masked: a [G, m_max, k], sfa [G, m_max, kb],
    out [G, m_max, n], grouped_layout = masked_m int32 [G] (rows past masked_m up to the
    block end are written too). m_sum / m_max in whole BLOCK_M blocks. All CPU tensors;
    schedule and launch_options go to pykernels.emu.launch. Returns the emulator's Stats.
    """
    args = fp8_gemm_args(compiled, a, sfa, b, sfb, out, grouped_layout)
    return launch_gemm(compiled, args, a.shape[-1], schedule, launch_options)
