"""Host side of the hand-written DSA kernels (csrc/dsa/*.cu, docs/dsa.md).

fp8_paged_mqa_logits (csrc/dsa/paged_logits.cu): inputs validated by pykernels.ops.dsa; here
what the kernel supports beyond that (`check_paged_logits_supported`), the tensor maps, the
grid and the argument packing -> LaunchPlan, run on the GPU ("cuda") or on the PTX emulator
("emu"). No host-device synchronisation. The kernel always writes -inf outside the windows
(clean_logits has no other form here, as in the reference) and does not read the schedule
metadata: its grid is (pages of max_context_len / PAGES_PER_CTA, b).

Kernel parameters, in order: tmap_q, tmap_k, cache, weights, context_lens, block_table, out,
out_stride (u64), weights_stride, bt_stride, next_n, lens_per_row, max_context_len.
"""
import torch

from ..reference import dsa as RD
from ..runtime.executors import run_plan
from ..runtime.hardware import cdiv
from ..runtime.plan import Arg, LaunchPlan, ptr, u32, u64
from ..runtime.tensormap import TensorMapDesc

MODULE = "dsa_paged_logits"
THREADS = 128                   # kThreads: one warpgroup
BLOCK_KV = 64                   # kBlockKv: keys per page, the wgmma M
HEAD_DIM = 128                  # kHeadDim: e4m3 bytes per key, one 128-byte swizzled row
PAGES_PER_CTA = 4               # kPagesPerCta
MAX_NEXT_N = 4                  # kMaxNextN
FUNCTIONS = {32: "pk_dsa_paged_logits_h32", 64: "pk_dsa_paged_logits_h64"}   # heads -> entry (the wgmma N)
PAGE_BYTES = BLOCK_KV * (HEAD_DIM + RD.INDEXER_SCALE_BYTES)


def smem_bytes(heads: int) -> int:
    """Smem<kHeads>::kBytes: 1024 alignment slack + PAGES_PER_CTA key pages (8 KB each) +
    MAX_NEXT_N Q tiles (heads x 128 bytes) + PAGES_PER_CTA + 1 mbarriers."""
    return 1024 + PAGES_PER_CTA * BLOCK_KV * HEAD_DIM + MAX_NEXT_N * heads * HEAD_DIM + 8 * (PAGES_PER_CTA + 1)


def check_paged_logits_supported(q, kv_cache, weights, out) -> None:
    """What the hand-written kernel supports beyond pykernels.ops.dsa's validation
    (ValueError naming the argument): head dim 128, 32 or 64 heads, next_n <= 4, pages of
    64 keys, 16-byte aligned q and cache (TMA), 4-byte aligned weights and out rows."""
    b, next_n, h, d = q.shape
    if d != HEAD_DIM:
        raise ValueError(f"q: the cuda/emu paged-logits kernel needs head dim {HEAD_DIM}, got {d}")
    if h not in FUNCTIONS:
        raise ValueError(f"q: the cuda/emu paged-logits kernel supports {sorted(FUNCTIONS)} heads, got {h}")
    if next_n > MAX_NEXT_N:
        raise ValueError(f"q: the cuda/emu paged-logits kernel supports next_n <= {MAX_NEXT_N}, got {next_n}")
    if kv_cache.shape[1] != BLOCK_KV:
        raise ValueError(f"kv_cache: the cuda/emu paged-logits kernel needs pages of {BLOCK_KV} keys, "
                         f"got block_kv {kv_cache.shape[1]}")
    if torch.compiler.is_compiling():
        return
    for name, t in (("q", q), ("kv_cache", kv_cache)):
        if t.numel() and t.data_ptr() % 16:
            raise ValueError(f"{name}: the cuda/emu paged-logits kernel reads it with TMA, which needs a "
                             f"16-byte aligned data pointer, got {t.data_ptr():#x}")
    if weights.stride(0) >= 2**32 or kv_cache.shape[0] >= 2**31 or b * next_n * h >= 2**31:
        raise ValueError("q, weights, kv_cache: the paged-logits kernel's indices are 32-bit, got shapes "
                         f"{list(q.shape)}, {list(weights.shape)}, {list(kv_cache.shape)}")


def key_view(kv_cache: torch.Tensor) -> torch.Tensor:
    """The keys of the cache as the kernel's tensor map sees them: uint8 [num_blocks, 64, 128]
    with page stride PAGE_BYTES (the scales after each page's keys are skipped)."""
    nb = kv_cache.shape[0]
    flat = kv_cache.view(torch.uint8).reshape(-1)
    return flat.as_strided((nb, BLOCK_KV, HEAD_DIM), (PAGE_BYTES, HEAD_DIM, 1))


def paged_logits_plan(q, kv_cache, weights, context_lens, block_table, out, max_context_len: int) -> LaunchPlan:
    """Launch plan of pk_dsa_paged_logits_h{32,64}: grid (ceil(ceil(max_context_len / 64) /
    PAGES_PER_CTA), b), 128 threads, smem_bytes(H) of dynamic shared memory."""
    b, next_n, h, _ = q.shape
    q2 = q.view(torch.uint8).reshape(b * next_n * h, HEAD_DIM)
    tmap_q = TensorMapDesc(q2, (h, HEAD_DIM), swizzle=128)
    tmap_k = TensorMapDesc(key_view(kv_cache), (1, BLOCK_KV, HEAD_DIM), swizzle=128)
    args = (Arg("tensormap", tmap_q), Arg("tensormap", tmap_k), ptr(kv_cache), ptr(weights), ptr(context_lens),
            ptr(block_table), ptr(out), u64(out.stride(0)), u32(weights.stride(0)), u32(block_table.stride(0)),
            u32(next_n), u32(int(context_lens.dim() == 2)), u32(max_context_len))
    grid = (max(1, cdiv(cdiv(max_context_len, BLOCK_KV), PAGES_PER_CTA)), b, 1)
    return LaunchPlan(MODULE, FUNCTIONS[h], grid=grid, block=(THREADS, 1, 1), args=args,
                      shared_bytes=smem_bytes(h))


def fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, out, max_context_len: int,
                         executor: str = "cuda"):
    """Indexer logits into out f32 [b * next_n, max_context_len] with the hand-written kernel;
    inputs as validated by pykernels.ops.dsa. Returns the emulator's Stats for executor
    "emu", else None."""
    check_paged_logits_supported(q, kv_cache, weights, out)
    b = q.shape[0]
    if b == 0 or max_context_len == 0 or kv_cache.shape[0] == 0:
        out.fill_(float("-inf"))        # no page: every position is outside every window
        return None
    return run_plan(paged_logits_plan(q, kv_cache, weights, context_lens, block_table, out, max_context_len),
                    executor)


__all__ = ["check_paged_logits_supported", "fp8_paged_mqa_logits", "paged_logits_plan", "smem_bytes", "MODULE",
           "FUNCTIONS"]
