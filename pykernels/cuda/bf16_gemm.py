"""Host side of the BF16 GEMM entries of csrc/gemm/fp8_gemm.cu (kBf16: pk_bf16_gemm_nt_*,
docs/gemm.md "BF16 GEMM").

The FP8 kernel's pipeline with bf16 operands: a stage is BLOCK_M x 64 bf16 of A and
BLOCK_N x 64 of B (128-byte swizzled TMA rows, as the FP8 stage's 128 e4m3), four wgmma
m64nBNk16 per stage accumulate in float32 across all of K; no scales. Normal layout, bf16
out (TMA store) or float32 out accumulated in place (*_f32acc: out += the product; the
caller puts c or zeros there first). The FP8 entries' parameter list (cuda/gemm.PARAMS):
the scale and grouping arguments are not read (null pointers; tmap_sfa and tmap_sfb repeat
tmap_a). Shared memory: the FP8 formula without the A scales (Config.smem_bytes; the
kernel traps when given less). The compiled entries are read from the build manifest.
"""
import dataclasses
import functools
import re

import torch

from ..runtime import artifacts, device_errors
from ..runtime.executors import run_plan
from ..runtime.hardware import SMEM_PER_BLOCK, TMA_ALIGNMENT_BYTES, cdiv, num_sms
from ..runtime.plan import Arg, LaunchPlan, ptr, u32, u64
from ..runtime.tensormap import TensorMapDesc
from . import gemm as G

MODULE = G.MODULE
BLOCK_K = 64                    # bf16 per 128-byte swizzled row: one stage's K
STAGE_ROW_BYTES = 128
_ENTRY = re.compile(r"pk_bf16_gemm_nt_m(\d+)n(\d+)(_f32acc)?")
OP = "bf16_gemm_nt"


@dataclasses.dataclass(frozen=True)
class Config:
    """One compiled bf16 tile shape BLOCK_M x BLOCK_N; f32acc: float32 out accumulated in place."""
    block_m: int
    block_n: int
    f32acc: bool = False

    @property
    def threads(self) -> int:
        return 128 * (self.block_m // 64 + 1)        # math warpgroups + the producer warpgroup

    @property
    def function(self) -> str:
        return f"pk_bf16_gemm_nt_m{self.block_m}n{self.block_n}{'_f32acc' if self.f32acc else ''}"

    def smem_bytes(self, stages: int) -> int:
        """Layout<BM, BN, false, true>::smem_bytes: 1024 alignment slack + stages x (A + B
        tiles) + a 64 x BLOCK_N bf16 staging tile per math warpgroup + 2 mbarriers per stage."""
        staging = (self.block_m // 64) * 64 * 2 * self.block_n
        return 1024 + stages * (self.block_m + self.block_n) * STAGE_ROW_BYTES + staging + 16 * stages

    def max_stages(self) -> int:
        s = G.MAX_STAGES
        while s > 1 and self.smem_bytes(s) > SMEM_PER_BLOCK:
            s -= 1
        return s


@functools.lru_cache(maxsize=None)
def compiled_configs(f32acc: bool = False) -> tuple:
    """The bf16 Configs compiled into MODULE (its PK_BF16_GEMM_ENTRY lines), larger tiles first."""
    found = []
    for function in artifacts.manifest()["kernels"][MODULE]["functions"]:
        match = _ENTRY.fullmatch(function)
        if match is not None and bool(match.group(3)) == f32acc:
            found.append(Config(int(match.group(1)), int(match.group(2)), f32acc))
    return tuple(sorted(found, key=lambda c: (-c.block_m, -c.block_n)))


def choose_config(m: int, n: int, f32acc: bool = False, sms: int = None) -> Config:
    """The largest tile that still gives every SM a tile, else the smallest (fewer idle SMs
    for small problems). A hand rule, not the FP8 GEMM's timing model: not measured."""
    configs = compiled_configs(f32acc)
    if not configs:
        raise RuntimeError(f"{MODULE}: no bf16 entry compiled (f32acc={f32acc})")
    sms = sms or G.DEFAULT_NUM_SMS
    for cfg in configs:
        if cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n) >= sms:
            return cfg
    return configs[-1]


def check_shapes(m: int, n: int, k: int) -> None:
    """Shapes the kernel supports (beyond ops.gemm.bf16_problem's validation)."""
    if n % 8:
        raise ValueError(f"n: the cuda BF16 GEMM needs N to be a multiple of 8 (16-byte output rows), got {n}")
    if (2 * k) % TMA_ALIGNMENT_BYTES:
        raise ValueError(f"k: expected a multiple of {TMA_ALIGNMENT_BYTES // 2} (16-byte TMA row strides), got {k}")
    if m >= 2**31 or n >= 2**31 or k >= 2**31:
        raise ValueError(f"a/b: TMA coordinates are 32-bit: m {m}, n {n}, k {k} must stay below 2^31")


def geometry(m: int, n: int, f32acc: bool, sms: int, cfg: Config = None, stages: int = None) -> tuple:
    """(config, stages, grid) of one launch (plan's, and what pykernels.explain prints):
    choose_config's tile unless given, the most stages that fit unless given, a persistent
    grid of at most one CTA per SM."""
    cfg = cfg or choose_config(m, n, f32acc, sms)
    stages = stages or cfg.max_stages()
    if stages < 1 or cfg.smem_bytes(stages) > SMEM_PER_BLOCK:
        raise ValueError(f"stages: {stages} stages of {cfg} need {cfg.smem_bytes(stages)} bytes of shared memory, "
                         f"more than {SMEM_PER_BLOCK}")
    return cfg, stages, max(1, min(sms, cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)))


def plan(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, cfg: Config = None, stages: int = None,
         sms: int = None) -> LaunchPlan:
    """Launch plan: a bf16 [m, k], b bf16 [n, k], out [m, n] bf16 or float32, all contiguous
    and 16-byte aligned; cfg / stages default to choose_config and the most stages that fit;
    a persistent grid of at most one CTA per SM."""
    m, k = a.shape
    n = b.shape[0]
    check_shapes(m, n, k)
    f32acc = out.dtype == torch.float32
    cfg, stages, grid = geometry(m, n, f32acc, sms or num_sms(a.device), cfg, stages)
    if cfg.f32acc != f32acc:
        raise ValueError(f"cfg: {cfg.function} writes {'float32' if cfg.f32acc else 'bf16'}, out is {out.dtype}")
    if not all(t.data_ptr() % 16 == 0 for t in (a, b, out)):
        raise ValueError("a, b, out: data pointers must be 16-byte aligned (TMA and 16-byte stores)")
    n_blocks = cdiv(n, cfg.block_n)
    tmap_a = TensorMapDesc(a, (cfg.block_m, BLOCK_K), swizzle=128)
    tmap_b = TensorMapDesc(b, (cfg.block_n, BLOCK_K), swizzle=128)
    # float32 out: the kernel stores with st.global; a valid map of 32-byte rows, unused
    tmap_out = TensorMapDesc(out.view(-1, n), (G.OUT_BOX_ROWS, 32 // out.element_size()), swizzle=32)
    record = device_errors.record_for(out.device, OP)
    args = (Arg("tensormap", tmap_a), Arg("tensormap", tmap_b), Arg("tensormap", tmap_a),
            Arg("tensormap", tmap_out), u64(0), ptr(out), u64(0), u32(m), u32(n), u32(k), u32(1),
            u32(G.KIND_NORMAL), u32(stages), u32(G.raster_band(n_blocks, grid)), ptr(record),
            Arg("tensormap", tmap_a), u64(0), u32(1))
    assert len(args) == len(G.PARAMS)
    return LaunchPlan(MODULE, cfg.function, grid=(grid, 1, 1), block=(cfg.threads, 1, 1), args=args,
                      shared_bytes=cfg.smem_bytes(stages), pdl=True)   # PDL as gemm.gemm_plan


def bf16_gemm_nt(a, b, out, executor: str = "cuda", cfg: Config = None, stages: int = None):
    """out[m, n] = a b^T: a bf16 [m, k], b bf16 [n, k], out bf16 (written) or float32 (out +=
    the product: ops.gemm.accumulation_base puts c or zeros there first). K = 0: bf16 zeros,
    float32 unchanged; M = 0 or N = 0: nothing to do (no launch: a TMA map cannot have a zero
    dimension)."""
    m, k = a.shape
    n = b.shape[0]
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out if out.dtype == torch.float32 else out.zero_()
    a, b = G._aligned_input(a), G._aligned_input(b)
    return G._with_aligned(out, lambda o: run_plan(plan(a, b, o, cfg, stages), executor))
