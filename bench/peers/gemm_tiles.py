"""What DeepGEMM's SM90 GEMM kernels (FP8 1D2D, BF16) share: the tile configuration and
persistent-grid template constants, the output tensor map, the launch geometry."""
import dataclasses

from pykernels import emu
from pykernels.runtime.hardware import SMEM_PER_BLOCK
from pykernels.runtime.tensormap import TensorMapDesc

from .checks import swizzle_mode

TMA_THREADS = 128             # one producer warpgroup
BARRIER_BYTES = 8
GEMM_TYPES = {"normal": "deep_gemm::GemmType::Normal", "contiguous": "deep_gemm::GemmType::MGroupedContiguous",
              "masked": "deep_gemm::GemmType::MGroupedMasked"}


@dataclasses.dataclass(frozen=True)
class GemmTiles:
    """A compile-time configuration of a GEMM kernel.

    block_m: 64, 128 or 256 rows per tile (64: one math warpgroup, else two);
    block_n: a multiple of 8 in [8, 256]; stages: pipeline depth; num_sms: the persistent
    grid (a template constant of the kernel's scheduler); cluster: 1, or 2 for TMA
    multicast (rank 0 of the pair loads the shared tile into both CTAs: A shared by two
    n-blocks if multicast_on_a, else B by two m-blocks); shape_m/n/k: dimensions compiled
    in as constants (0: passed at run time; shape_m is m_max for "masked"); kind: the
    GEMM layout ("normal", "contiguous" or "masked" grouping along M, over num_groups)."""
    block_m: int
    block_n: int
    stages: int
    num_sms: int
    cluster: int = 1
    multicast_on_a: bool = False
    shape_m: int = 0
    shape_n: int = 0
    shape_k: int = 0
    kind: str = "normal"
    num_groups: int = 1

    def __post_init__(self):
        if self.kind not in GEMM_TYPES:
            raise ValueError(f"kind: expected one of {sorted(GEMM_TYPES)}, got {self.kind!r}")
        if self.num_groups < 1 or (self.kind == "normal" and self.num_groups != 1):
            raise ValueError(f"num_groups: expected 1 for a normal GEMM, >= 1 for a grouped one, got {self.num_groups}")
        if self.block_m not in (64, 128, 256):
            raise ValueError(f"block_m: expected 64, 128 or 256, got {self.block_m}")
        if not (8 <= self.block_n <= 256 and self.block_n % 8 == 0):
            raise ValueError(f"block_n: expected a multiple of 8 in [8, 256], got {self.block_n}")
        if self.cluster not in (1, 2):
            raise ValueError(f"cluster: expected 1 or 2, got {self.cluster}")
        if self.num_sms < 1 or self.num_sms % self.cluster:
            raise ValueError(f"num_sms: expected a positive multiple of the cluster ({self.cluster}), "
                             f"got {self.num_sms}")
        if self.stages < 1:
            raise ValueError(f"stages: expected at least 1, got {self.stages}")
        need = self.shared_bytes(self.shape_k or 1)
        if need > SMEM_PER_BLOCK:
            raise ValueError(f"stages: {self.stages} stages need {need} bytes of shared memory, "
                             f"more than {SMEM_PER_BLOCK}")

    def shared_bytes(self, k: int) -> int:
        raise NotImplementedError

    @property
    def math_threads(self) -> int:
        return 128 if self.block_m == 64 else 256

    @property
    def threads(self) -> int:
        return TMA_THREADS + self.math_threads

    @property
    def swizzle_d(self) -> int:
        return swizzle_mode(self.block_n * 2)

    @property
    def store_block_n(self) -> int:
        """Columns per TMA store box: one swizzle row of bf16, or the whole tile unswizzled."""
        return self.swizzle_d // 2 if self.swizzle_d else self.block_n

    def tail_template_args(self) -> list:
        """Template arguments after the swizzle modes: stages ... kNumSMs, GemmType."""
        return [self.stages, TMA_THREADS, self.math_threads, self.cluster,
                "true" if self.multicast_on_a else "false", self.num_sms, GEMM_TYPES[self.kind]]

    def check_dims(self, m: int, n: int, k: int) -> None:
        if n % 8:
            raise ValueError(f"b: N must be a multiple of 8 (the kernel asserts it), got {n}")
        for dim, got in (("shape_m", m), ("shape_n", n), ("shape_k", k)):
            want = getattr(self, dim)
            if want and want != got:
                raise ValueError(f"{dim}: the kernel was compiled for {want}, got {got}")

    def output_map(self, out) -> TensorMapDesc:
        """D: [m, n] bf16, stored by TMA in block_m x store_block_n boxes, swizzle_d."""
        return TensorMapDesc(out, (self.block_m, self.store_block_n), self.swizzle_d)


def launch_gemm(compiled, args, k: int, schedule: str, launch_options: dict):
    """The persistent launch: num_sms CTAs in clusters of `cluster`, producer + math threads."""
    cfg = compiled.config
    return emu.launch(compiled.ptx.ptx, compiled.ptx.entry, (cfg.num_sms, 1, 1), (cfg.threads, 1, 1), args,
                      shared_mem=cfg.shared_bytes(k), cluster=(cfg.cluster, 1, 1), schedule=schedule,
                      **launch_options)
