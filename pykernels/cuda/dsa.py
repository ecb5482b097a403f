"""Host side of the hand-written DSA kernels (csrc/dsa/*.cu, docs/dsa.md).

Indexer logits (csrc/dsa/indexer_logits.cu): fp8_paged_mqa_logits (decode, paged key cache)
and fp8_mqa_logits (prefill, ragged windows over k [N, 128]). Inputs are validated by
pykernels.ops.dsa; here what the kernel supports beyond that (`check_logits_supported`), the
tensor maps, the grid and the argument packing -> LaunchPlan, run on the GPU ("cuda") or on
the PTX emulator ("emu"). No host-device synchronisation. The kernel always writes -inf
outside the windows (clean_logits has no other form here, as in the reference) and does not
read the paged schedule metadata: its grid is (64-key blocks of the width / BLOCKS_PER_CTA,
row groups): a paged sequence's next_n rows, or GROUP_ROWS consecutive prefill rows.

Kernel parameters, in order: tmap_q, tmap_k, weights, out, out_stride (u64), weights_stride,
width, then paged: cache, context_lens, block_table, bt_stride, next_n, lens_per_row; ragged:
k_scales, cu_seqlen_ks, cu_seqlen_ke, num_rows.
"""
import torch

from ..reference import dsa as RD
from ..runtime.executors import run_plan
from ..runtime.hardware import cdiv
from ..runtime.plan import Arg, LaunchPlan, ptr, u32, u64
from ..runtime.tensormap import TensorMapDesc

MODULE = "dsa_indexer_logits"
THREADS = 128                   # kThreads: one warpgroup
BLOCK_KV = 64                   # kBlockKeys: keys per block (a page), the wgmma M
HEAD_DIM = 128                  # kHeadDim: e4m3 bytes per key, one 128-byte swizzled row
BLOCKS_PER_CTA = 4              # kBlocksPerCta
GROUP_ROWS = 4                  # kMaxGroupRows: query rows per CTA (paged: next_n <= 4)
HEADS = (32, 64)                # the instantiations (the wgmma N)
PAGED_FUNCTIONS = {h: f"pk_dsa_paged_logits_h{h}" for h in HEADS}
RAGGED_FUNCTIONS = {h: f"pk_dsa_ragged_logits_h{h}" for h in HEADS}
PAGE_BYTES = BLOCK_KV * (HEAD_DIM + RD.INDEXER_SCALE_BYTES)


def smem_bytes(heads: int) -> int:
    """Smem<kHeads>::kBytes: 1024 alignment slack + BLOCKS_PER_CTA key blocks (8 KB each) +
    GROUP_ROWS Q tiles (heads x 128 bytes) + BLOCKS_PER_CTA + 1 mbarriers."""
    return 1024 + BLOCKS_PER_CTA * BLOCK_KV * HEAD_DIM + GROUP_ROWS * heads * HEAD_DIM + 8 * (BLOCKS_PER_CTA + 1)


def check_logits_supported(q, keys, weights, keys_name: str) -> None:
    """What the hand-written indexer-logits kernel supports beyond pykernels.ops.dsa's
    validation (ValueError naming the argument): head dim 128, 32 or 64 heads, next_n <= 4
    (q [b, next_n, H, D]: the paged form), pages of 64 keys, 16-byte aligned q and keys
    (`keys_name`: kv_cache or k; TMA), 32-bit row indices."""
    h, d = q.shape[-2:]
    if d != HEAD_DIM:
        raise ValueError(f"q: the cuda/emu indexer-logits kernel needs head dim {HEAD_DIM}, got {d}")
    if h not in HEADS:
        raise ValueError(f"q: the cuda/emu indexer-logits kernel supports {list(HEADS)} heads, got {h}")
    if q.dim() == 4:
        if q.shape[1] > GROUP_ROWS:
            raise ValueError(f"q: the cuda/emu indexer-logits kernel supports next_n <= {GROUP_ROWS}, "
                             f"got {q.shape[1]}")
        if keys.shape[1] != BLOCK_KV:
            raise ValueError(f"kv_cache: the cuda/emu indexer-logits kernel needs pages of {BLOCK_KV} keys, "
                             f"got block_kv {keys.shape[1]}")
    if torch.compiler.is_compiling():
        return
    for name, t in (("q", q), (keys_name, keys)):
        if t.numel() and t.data_ptr() % 16:
            raise ValueError(f"{name}: the cuda/emu indexer-logits kernel reads it with TMA, which needs a "
                             f"16-byte aligned data pointer, got {t.data_ptr():#x}")
    if weights.stride(0) >= 2**32 or keys.shape[0] * BLOCK_KV >= 2**31 or q.numel() // HEAD_DIM >= 2**31:
        raise ValueError(f"q, weights, {keys_name}: the indexer-logits kernel's indices are 32-bit, got shapes "
                         f"{list(q.shape)}, {list(weights.shape)}, {list(keys.shape)}")


def key_view(kv_cache: torch.Tensor) -> torch.Tensor:
    """The keys of the cache as the kernel's tensor map sees them: uint8 [num_blocks, 64, 128]
    with page stride PAGE_BYTES (the scales after each page's keys are skipped)."""
    nb = kv_cache.shape[0]
    flat = kv_cache.view(torch.uint8).reshape(-1)
    return flat.as_strided((nb, BLOCK_KV, HEAD_DIM), (PAGE_BYTES, HEAD_DIM, 1))


def _q_map(q, heads: int) -> TensorMapDesc:
    return TensorMapDesc(q.view(torch.uint8).reshape(-1, HEAD_DIM), (heads, HEAD_DIM), swizzle=128)


def _common_args(weights, out, width: int) -> tuple:
    return (ptr(weights), ptr(out), u64(out.stride(0)), u32(weights.stride(0)), u32(width))


def _grid(width: int, groups: int) -> tuple:
    return (max(1, cdiv(cdiv(width, BLOCK_KV), BLOCKS_PER_CTA)), groups, 1)


def paged_logits_plan(q, kv_cache, weights, context_lens, block_table, out, max_context_len: int) -> LaunchPlan:
    """Launch plan of pk_dsa_paged_logits_h{32,64}: grid (ceil(ceil(max_context_len / 64) /
    BLOCKS_PER_CTA), b), 128 threads, smem_bytes(H) of dynamic shared memory."""
    b, next_n, h, _ = q.shape
    tmap_k = TensorMapDesc(key_view(kv_cache), (1, BLOCK_KV, HEAD_DIM), swizzle=128)
    args = (Arg("tensormap", _q_map(q, h)), Arg("tensormap", tmap_k), *_common_args(weights, out, max_context_len),
            ptr(kv_cache), ptr(context_lens), ptr(block_table), u32(block_table.stride(0)), u32(next_n),
            u32(int(context_lens.dim() == 2)))
    return LaunchPlan(MODULE, PAGED_FUNCTIONS[h], grid=_grid(max_context_len, b), block=(THREADS, 1, 1), args=args,
                      shared_bytes=smem_bytes(h))


def ragged_logits_plan(q, k, k_scales, weights, cu_seqlen_ks, cu_seqlen_ke, out) -> LaunchPlan:
    """Launch plan of pk_dsa_ragged_logits_h{32,64}: grid (ceil(ceil(N / 64) / BLOCKS_PER_CTA),
    ceil(M / GROUP_ROWS)), 128 threads, smem_bytes(H) of dynamic shared memory; k [N, 128] e4m3
    through a 2-D map (64-key boxes; keys past N zero-filled, never written out)."""
    m, h, _ = q.shape
    n = k.shape[0]
    tmap_k = TensorMapDesc(k.view(torch.uint8), (BLOCK_KV, HEAD_DIM), swizzle=128)
    args = (Arg("tensormap", _q_map(q, h)), Arg("tensormap", tmap_k), *_common_args(weights, out, n),
            ptr(k_scales), ptr(cu_seqlen_ks), ptr(cu_seqlen_ke), u32(m))
    return LaunchPlan(MODULE, RAGGED_FUNCTIONS[h], grid=_grid(n, cdiv(m, GROUP_ROWS)), block=(THREADS, 1, 1),
                      args=args, shared_bytes=smem_bytes(h))


def fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, out, max_context_len: int,
                         executor: str = "cuda"):
    """Decode indexer logits into out f32 [b * next_n, max_context_len] with the hand-written
    kernel; inputs as validated by pykernels.ops.dsa. Returns the emulator's Stats for
    executor "emu", else None."""
    check_logits_supported(q, kv_cache, weights, "kv_cache")
    if q.shape[0] == 0 or max_context_len == 0 or kv_cache.shape[0] == 0:
        out.fill_(float("-inf"))        # no page: every position is outside every window
        return None
    return run_plan(paged_logits_plan(q, kv_cache, weights, context_lens, block_table, out, max_context_len),
                    executor)


def fp8_mqa_logits(q, k, k_scales, weights, cu_seqlen_ks, cu_seqlen_ke, out, executor: str = "cuda"):
    """Prefill indexer logits into out f32 [M, N] with the hand-written kernel; inputs as
    validated by pykernels.ops.dsa. Returns the emulator's Stats for executor "emu", else None."""
    check_logits_supported(q, k, weights, "k")
    if q.shape[0] == 0 or k.shape[0] == 0:
        return None                     # out is empty
    return run_plan(ragged_logits_plan(q, k, k_scales, weights, cu_seqlen_ks, cu_seqlen_ke, out), executor)


__all__ = ["check_logits_supported", "fp8_paged_mqa_logits", "fp8_mqa_logits", "paged_logits_plan",
           "ragged_logits_plan", "smem_bytes", "MODULE", "PAGED_FUNCTIONS", "RAGGED_FUNCTIONS"]
