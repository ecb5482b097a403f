"""Host side of the hand-written DSA kernels (csrc/dsa/*.cu, docs/dsa.md).

Indexer logits (csrc/dsa/indexer_logits.cu): fp8_paged_mqa_logits (decode, paged key cache)
and fp8_mqa_logits (prefill, ragged windows over k [N, 128]). Inputs are validated by
pykernels.ops.dsa; here what the kernel supports beyond that (`check_logits_supported`), the
tensor maps, the grid and the argument packing -> LaunchPlan, run on the GPU ("cuda") or on
the PTX emulator ("emu"). No host-device synchronisation. The kernel always writes -inf
outside the windows (clean_logits has no other form here, as in the reference) and does not
read the paged schedule metadata: persistent CTAs (as many as the GPU holds at once, or fewer
when there is less work) walk the work items (row group x chunk of BLOCKS_PER_CTA key blocks;
a row group is a paged sequence's next_n rows or GROUP_ROWS consecutive prefill rows)
through a two-stage TMA ring.

Kernel parameters, in order: tmap_q, tmap_k, tmap_s (the key scales), weights, out,
out_stride (u64), weights_stride, width, then paged: context_lens, block_table, bt_stride,
next_n, lens_per_row, b, record, lens_limit, num_blocks; ragged: cu_seqlen_ks, cu_seqlen_ke,
num_rows, record. record: the device error record (pykernels.runtime.device_errors), where
the kernel checks context_lens (in [0, lens_limit = min(width, block table pages x 64)]), the
block-table pages in use (in [0, num_blocks)) and the windows (0 <= ks <= ke <= N); the
emulator raises a recorded error right after the launch, the GPU at check_errors().

Sparse MLA decode (csrc/mla/decode.cu's pk_mla_sparse_decode_fp8 + pk_mla_combine_sink): the
dense FP8 decode's plan (pykernels/cuda/mla.py) with every sequence scheduled as topk tokens,
each 64-slot block gathered token row by token row (one bulk copy per used slot) and masked
by slot, attn_sink applied where the output is normalised. h_q a multiple of 64 (a CTA's 64
query rows are one query token's heads); h_q <= 32 takes the narrow kernel's sparse form
(csrc/mla/decode_narrow.cu's pk_mla_sparse_decode_narrow_n{16,32}: one token's h_q heads as
wgmma's N, each block's used rows gathered by bulk copies; `sparse_decode_plans` picks).

Sparse MLA prefill (decode.cu's pk_mla_sparse_prefill_bf16; flash_mla_sparse_fwd): the sparse
decode's plan with the s_q query tokens as its batch (s_q 1), kv's bf16 rows copied by the
producer warpgroup instead of converted, a schedule of whole tokens made from the shapes
(sparse_prefill_schedule: no split, no combine) and max_logits written beside lse; parameters:
the sparse decode's + row_bytes (u64), max_logits, its strides (b: u64, h).

The paged logits' schedule (csrc/dsa/logits_schedule.cu): get_paged_mqa_logits_metadata on
the device (one CTA: a block scan of the splits per sequence, a binary search per partition),
no host read of context_lens.

Top-k (csrc/dsa/topk.cu): topk_indices (prefill) and paged_topk_indices (decode), one CTA per
logits row (radix select, compaction, bitonic sort in shared memory; the reference's order
exactly). Parameters: logits, out, ks, ke, context_lens, block_table (the other form's
pointers null), logits_stride, out_stride0, out_stride1 (u64), topk, sort_size, next_n,
lens_per_row, bt_stride, record, width (logits columns), lens_limit, num_pages (TOPK_PAGE_LIMIT):
the kernel checks each row's window (0 <= ks <= ke <= width), context length (in [0,
lens_limit = min(width, block table pages x 64)]) and the pages it uses (in [0, num_pages))
into the device error record.
"""
import torch

from ..reference import dsa as RD
from ..runtime import device_errors
from ..runtime.executors import run_plan
from ..runtime.hardware import SMEM_PER_SM, cdiv, num_sms, round_up
from ..runtime.plan import Arg, LaunchPlan, ptr, u32, u64
from ..runtime.plan import ptr_or_null as _opt  # optional pointers: null when None
from ..runtime.tensormap import TensorMapDesc

MODULE = "dsa_indexer_logits"
PAGED_OP_NAME = "fp8_paged_mqa_logits"     # names the op in a recorded input error
RAGGED_OP_NAME = "fp8_mqa_logits"
THREADS = 160                   # kThreads: the math warpgroup + the producer warp
BLOCK_KV = 64                   # kBlockKeys: keys per block (a page), the wgmma M
HEAD_DIM = 128                  # kHeadDim: e4m3 bytes per key, one 128-byte swizzled row
BLOCKS_PER_CTA = 4              # kBlocksPerCta
GROUP_ROWS = 4                  # kMaxGroupRows: query rows per CTA (paged: next_n <= 4)
HEADS = (32, 64)                # the instantiations (the wgmma N per query row)
# paged: (heads, query rows per wgmma) -> entry; 2 rows (a wgmma of N = 2 x heads over two
# consecutive Q tiles) when next_n is even, else 1. Ragged: 1 row per wgmma.
PAGED_FUNCTIONS = {(h, r): f"pk_dsa_paged_logits_h{h}" + ("_x2" if r == 2 else "") for h in HEADS for r in (1, 2)}
RAGGED_FUNCTIONS = {h: f"pk_dsa_ragged_logits_h{h}" for h in HEADS}


def rows_per_wgmma(next_n: int) -> int:
    """Query rows of a sequence one wgmma of the paged kernel covers: 2 for an even next_n."""
    return 2 if next_n % 2 == 0 else 1
PAGE_BYTES = BLOCK_KV * (HEAD_DIM + RD.INDEXER_SCALE_BYTES)


STAGES = 2                      # kStages: the TMA ring's stages
ITEM_INFO_BYTES = 4 + 8 * GROUP_ROWS + 4 * BLOCKS_PER_CTA     # sizeof(ItemInfo)


def stage_bytes(heads: int, group_rows: int) -> int:
    """stage_bytes(): BLOCKS_PER_CTA key blocks (8 KB each) and their scales (256 bytes each)
    + group_rows Q tiles (heads x 128 bytes) and weights rows (heads x 4 bytes), rounded up to 1024."""
    return round_up(BLOCKS_PER_CTA * BLOCK_KV * (HEAD_DIM + RD.INDEXER_SCALE_BYTES)
                    + group_rows * heads * (HEAD_DIM + 4), 1024)


def smem_bytes(heads: int, group_rows: int = GROUP_ROWS) -> int:
    """Dynamic shared memory: 1024 alignment slack + STAGES stages + (BLOCKS_PER_CTA + 2)
    mbarriers per stage (one per key block, the Q tiles', the stage's release) + an ItemInfo
    per stage (ITEM_INFO_BYTES: the used-block mask, GROUP_ROWS windows, the blocks' coordinates)."""
    return 1024 + STAGES * (stage_bytes(heads, group_rows) + 8 * (BLOCKS_PER_CTA + 2) + ITEM_INFO_BYTES)


def ctas_per_sm(heads: int, group_rows: int) -> int:
    """CTAs of the kernel one SM holds (its 228 KB of shared memory, at most 2048 threads)."""
    return max(1, min(2048 // THREADS, SMEM_PER_SM // smem_bytes(heads, group_rows)))


def check_logits_supported(q, keys, weights, keys_name: str, k_scales=None) -> None:
    """What the hand-written indexer-logits kernel supports beyond pykernels.ops.dsa's
    validation (ValueError naming the argument): head dim 128, 32 or 64 heads, next_n <= 4
    (q [b, next_n, H, D]: the paged form), pages of 64 keys, 16-byte aligned q and keys
    (`keys_name`: kv_cache or k; TMA; the prefill form's k_scales too), 32-bit row indices."""
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
    for name, t in (("q", q), (keys_name, keys), ("k_scales", k_scales)):
        if t is not None and t.numel() and t.data_ptr() % 16:
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


def scale_view(kv_cache: torch.Tensor) -> torch.Tensor:
    """The key scales of the cache as the kernel's tensor map sees them: float32 [num_blocks, 64]
    with page stride PAGE_BYTES (each page's scales follow its 64 x 128 key bytes)."""
    nb = kv_cache.shape[0]
    flat = kv_cache.view(torch.uint8).reshape(-1).view(torch.float32)
    return flat.as_strided((nb, BLOCK_KV), (PAGE_BYTES // 4, 1), BLOCK_KV * HEAD_DIM // 4)


def _q_map(q, heads: int) -> TensorMapDesc:
    return TensorMapDesc(q.view(torch.uint8).reshape(-1, HEAD_DIM), (heads, HEAD_DIM), swizzle=128)


def _common_args(weights, out, width: int) -> tuple:
    return (ptr(weights), ptr(out), u64(out.stride(0)), u32(weights.stride(0)), u32(width))


def _grid(width: int, groups: int, heads: int, group_rows: int, device, max_ctas) -> tuple:
    """Persistent CTAs: the work items, at most what the GPU holds at once (or max_ctas)."""
    items = groups * cdiv(cdiv(width, BLOCK_KV), BLOCKS_PER_CTA)
    resident = num_sms(device) * ctas_per_sm(heads, group_rows) if max_ctas is None else max_ctas
    return (max(1, min(items, resident)), 1, 1)


def paged_logits_plan(q, kv_cache, weights, context_lens, block_table, out, max_context_len: int,
                      max_ctas: int = None, record: torch.Tensor = None) -> LaunchPlan:
    """Launch plan of pk_dsa_paged_logits_h{32,64}[_x2] (_x2: two query rows per wgmma, for an
    even next_n): persistent CTAs over the b x ceil(ceil(max_context_len / 64) / BLOCKS_PER_CTA)
    work items (max_ctas: cap the grid, e.g. to make each CTA walk several items), THREADS
    threads, smem_bytes(H, next_n); record: the device error record (default: the device's)."""
    b, next_n, h, _ = q.shape
    record = device_errors.record_for(q.device, PAGED_OP_NAME) if record is None else record
    lens_limit = min(max_context_len, block_table.shape[1] * BLOCK_KV)
    tmap_k = TensorMapDesc(key_view(kv_cache), (1, BLOCK_KV, HEAD_DIM), swizzle=128)
    tmap_s = TensorMapDesc(scale_view(kv_cache), (1, BLOCK_KV))
    args = (Arg("tensormap", _q_map(q, h)), Arg("tensormap", tmap_k), Arg("tensormap", tmap_s),
            *_common_args(weights, out, max_context_len), ptr(context_lens), ptr(block_table),
            u32(block_table.stride(0)), u32(next_n), u32(int(context_lens.dim() == 2)), u32(b), ptr(record),
            u32(lens_limit), u32(kv_cache.shape[0]))
    grid = _grid(max_context_len, b, h, next_n, q.device, max_ctas)
    return LaunchPlan(MODULE, PAGED_FUNCTIONS[h, rows_per_wgmma(next_n)], grid=grid,
                      block=(THREADS, 1, 1), args=args, shared_bytes=smem_bytes(h, next_n))


def ragged_logits_plan(q, k, k_scales, weights, cu_seqlen_ks, cu_seqlen_ke, out, max_ctas: int = None,
                       record: torch.Tensor = None) -> LaunchPlan:
    """Launch plan of pk_dsa_ragged_logits_h{32,64}: persistent CTAs over the ceil(M /
    GROUP_ROWS) x ceil(ceil(N / 64) / BLOCKS_PER_CTA) work items, THREADS threads,
    smem_bytes(H); k [N, 128] e4m3 through a 2-D map (64-key boxes; keys past N zero-filled,
    never written out); record: the device error record (default: the device's)."""
    m, h, _ = q.shape
    record = device_errors.record_for(q.device, RAGGED_OP_NAME) if record is None else record
    n = k.shape[0]
    tmap_k = TensorMapDesc(k.view(torch.uint8), (BLOCK_KV, HEAD_DIM), swizzle=128)
    tmap_s = TensorMapDesc(k_scales, (BLOCK_KV,))                     # scales past N: zero-filled
    args = (Arg("tensormap", _q_map(q, h)), Arg("tensormap", tmap_k), Arg("tensormap", tmap_s),
            *_common_args(weights, out, n), ptr(cu_seqlen_ks), ptr(cu_seqlen_ke), u32(m), ptr(record))
    return LaunchPlan(MODULE, RAGGED_FUNCTIONS[h], grid=_grid(n, cdiv(m, GROUP_ROWS), h, GROUP_ROWS, q.device,
                                                              max_ctas),
                      block=(THREADS, 1, 1), args=args, shared_bytes=smem_bytes(h))


def fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, out, max_context_len: int,
                         executor: str = "cuda"):
    """Decode indexer logits into out f32 [b * next_n, max_context_len] with the hand-written
    kernel; inputs as validated by pykernels.ops.dsa. Returns the emulator's Stats for
    executor "emu", else None."""
    check_logits_supported(q, kv_cache, weights, "kv_cache")
    if q.shape[0] == 0 or max_context_len == 0 or kv_cache.shape[0] == 0:
        out.fill_(float("-inf"))        # no page: every position is outside every window
        return None
    plan = paged_logits_plan(q, kv_cache, weights, context_lens, block_table, out, max_context_len)
    return _run_checked(plan, executor, PAGED_OP_NAME)


def _run_checked(plan: LaunchPlan, executor: str, op: str):
    """Run the plan; on the emulator raise an input error the kernel recorded at once (on the
    GPU the record is not read here: device_errors.check_errors does)."""
    stats = run_plan(plan, executor)
    if executor == "emu":
        device_errors.raise_if_set(device_errors.record_for(torch.device("cpu"), op), op)
    return stats


def fp8_mqa_logits(q, k, k_scales, weights, cu_seqlen_ks, cu_seqlen_ke, out, executor: str = "cuda"):
    """Prefill indexer logits into out f32 [M, N] with the hand-written kernel; inputs as
    validated by pykernels.ops.dsa. Returns the emulator's Stats for executor "emu", else None."""
    check_logits_supported(q, k, weights, "k", k_scales)
    if q.shape[0] == 0 or k.shape[0] == 0:
        return None                     # out is empty
    return _run_checked(ragged_logits_plan(q, k, k_scales, weights, cu_seqlen_ks, cu_seqlen_ke, out), executor,
                        RAGGED_OP_NAME)


TOPK_MODULE = "dsa_topk"
TOPK_THREADS = 512                     # kThreads
TOPK_SHARED_HEADER = 1104              # sizeof(Shared) rounded to 16: 256 bins + 16 warp sums + 4 words
MAX_TOPK = 8192                        # the sort holds next_pow2(topk) 8-byte entries in shared memory
TOPK_PAGE_LIMIT = (2**31 - 1) // BLOCK_KV + 1     # page ids below it: page * 64 + offset fits int32
TOPK_OP_NAME, PAGED_TOPK_OP_NAME = "topk_indices", "paged_topk_indices"     # name the op in a recorded error


def topk_smem_bytes(topk: int) -> int:
    return TOPK_SHARED_HEADER + 8 * _next_pow2(topk)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def check_topk_supported(topk: int) -> None:
    """ValueError when topk is beyond what the hand-written top-k handles (its sort lives in
    shared memory: at most MAX_TOPK entries)."""
    if topk > MAX_TOPK:
        raise ValueError(f"topk: the cuda/emu top-k kernel sorts in shared memory, expected at most {MAX_TOPK}, "
                         f"got {topk}")


def topk_plan(logits, out, topk: int, *, cu_seqlen_ks=None, cu_seqlen_ke=None, context_lens=None,
              block_table=None, record: torch.Tensor = None) -> LaunchPlan:
    """Launch plan of pk_dsa_topk_prefill (windows cu_seqlen_ks / ke; out int32 [M, topk]) or
    pk_dsa_topk_paged (context_lens, block_table; out int32 [b, next_n, topk]): one CTA of
    TOPK_THREADS per logits row, topk_smem_bytes(topk) of dynamic shared memory; record: the
    device error record (default: the device's)."""
    paged = block_table is not None
    if record is None:
        record = device_errors.record_for(logits.device, PAGED_TOPK_OP_NAME if paged else TOPK_OP_NAME)
    width = logits.shape[1]
    lens_limit = min(width, block_table.shape[1] * BLOCK_KV) if paged else 0
    rows = logits.shape[0]
    next_n = rows // block_table.shape[0] if paged else 1
    stride0, stride1 = (out.stride(0), out.stride(1)) if paged else (out.stride(0), 0)
    args = (ptr(logits), ptr(out), _opt(cu_seqlen_ks), _opt(cu_seqlen_ke), _opt(context_lens), _opt(block_table),
            u64(logits.stride(0)), u64(stride0), u64(stride1), u32(topk), u32(_next_pow2(topk)), u32(next_n),
            u32(int(paged and context_lens.dim() == 2)), u32(block_table.stride(0) if paged else 0), ptr(record),
            u32(width), u32(lens_limit), u32(TOPK_PAGE_LIMIT))
    return LaunchPlan(TOPK_MODULE, "pk_dsa_topk_paged" if paged else "pk_dsa_topk_prefill", grid=(rows, 1, 1),
                      block=(TOPK_THREADS, 1, 1), args=args, shared_bytes=topk_smem_bytes(topk))


def topk_indices(logits, cu_seqlen_ks, cu_seqlen_ke, topk: int, out, executor: str = "cuda"):
    """Prefill top-k into out int32 [M, topk] (key positions, -1 past each window's length)."""
    check_topk_supported(topk)
    if logits.shape[0] == 0:
        return None
    return _run_checked(topk_plan(logits, out, topk, cu_seqlen_ks=cu_seqlen_ks, cu_seqlen_ke=cu_seqlen_ke), executor,
                        TOPK_OP_NAME)


def paged_topk_indices(logits, context_lens, block_table, topk: int, out, executor: str = "cuda"):
    """Decode top-k into out int32 [b, next_n, topk] (cache rows block * 64 + offset, -1 unused)."""
    check_topk_supported(topk)
    if logits.shape[0] == 0:
        return None
    return _run_checked(topk_plan(logits, out, topk, context_lens=context_lens, block_table=block_table), executor,
                        PAGED_TOPK_OP_NAME)


SCHEDULE_MODULE = "dsa_logits_schedule"
SCHEDULE_THREADS = 1024
SCHEDULE_OP_NAME = "get_paged_mqa_logits_metadata"     # names the op in a recorded input error
MAX_SCHEDULE_SEQUENCES = 32768         # the prefix sums live in shared memory (4 bytes each)


def check_logits_schedule_supported(context_lens) -> None:
    """ValueError when there are more sequences than the kernel's shared-memory prefix holds."""
    if context_lens.shape[0] > MAX_SCHEDULE_SEQUENCES:
        raise ValueError(f"context_lens: the cuda/emu schedule kernel holds at most {MAX_SCHEDULE_SEQUENCES} "
                         f"sequences, got {context_lens.shape[0]}")


def paged_logits_schedule(context_lens, block_kv: int, num_sms: int, executor: str = "cuda") -> torch.Tensor:
    """get_paged_mqa_logits_metadata with the hand-written kernel: int32 [num_sms + 1, 2]; a
    negative context length is recorded in the device error record (counted as 0)."""
    check_logits_schedule_supported(context_lens)
    meta = torch.empty((num_sms + 1, RD.METADATA_WIDTH), dtype=torch.int32, device=context_lens.device)
    b = context_lens.shape[0]
    next_n = context_lens.shape[1] if context_lens.dim() == 2 else 1
    args = (ptr(context_lens), ptr(meta), u32(b), u32(next_n), u32(int(context_lens.dim() == 2)), u32(block_kv),
            u32(num_sms), ptr(device_errors.record_for(context_lens.device, SCHEDULE_OP_NAME)))
    _run_checked(LaunchPlan(SCHEDULE_MODULE, "pk_dsa_logits_schedule", grid=(1, 1, 1), block=(SCHEDULE_THREADS, 1, 1),
                            args=args, shared_bytes=4 * b), executor, SCHEDULE_OP_NAME)
    return meta


SPARSE_DECODE_FUNCTION = "pk_mla_sparse_decode_fp8"
SPARSE_COMBINE_FUNCTION = "pk_mla_combine_sink"
SPARSE_OP_NAME = "flash_mla_sparse_decode"     # names the op in a recorded input error


def sparse_decode_smem_bytes() -> int:
    """Smem<true>::kBytes: the FP8 decode's shared memory + one u64 used-slot mask per K stage
    + the slot indices staged a block ahead (2 buffers x 128 producer threads x 2 int32)."""
    from . import mla as CM
    return CM.SMEM_BYTES_FP8 + 8 * CM.STAGES + 2 * 128 * 2 * 4


def check_sparse_decode_supported(q, k_cache, head_dim_v: int) -> None:
    """What the hand-written sparse decode supports beyond pykernels.ops.dsa's validation
    (ValueError naming the argument): the dense FP8 kernel's limits and h_q at most 32 (the
    narrow kernel) or a multiple of 64."""
    from . import mla as CM
    CM.check_supported(q, k_cache, head_dim_v)
    h_q = q.shape[2]
    if h_q > CM.NARROW_MAX_ROWS and h_q % 64:
        raise ValueError(f"q: the cuda/emu sparse decode kernels need h_q at most {CM.NARROW_MAX_ROWS} or a multiple "
                         f"of 64 (a CTA's query rows are one token's heads), got h_q {h_q}")


def sparse_decode_plans(q, k_cache, indices, attn_sink, topk_length, tile_scheduler_metadata, num_splits, out, lse,
                        softmax_scale: float, record):
    """(decode plan, combine plan) of the sparse decode writing out / lse (TMA/vector-ready
    tensors: see sparse_decode), with every sequence scheduled as topk tokens; without a
    schedule one is made (get_mla_metadata over topk tokens per sequence, the default
    partition count: per row tile of 64 query rows, or per query token for the narrow kernel).
    h_q <= 32: the narrow kernel's sparse entry (grid partitions x s_q), else the 64-row one."""
    import dataclasses

    from .. import mla_schedule as MS
    from ..reference import mla as RM
    from . import mla as CM
    b, s_q, h_q, _ = q.shape
    topk = indices.shape[2]
    lens = torch.full((b,), topk, dtype=torch.int32)        # the schedule's unit: topk slots per sequence
    seqlens = lens.to(q.device)
    narrow = CM.narrow_tile_rows(h_q) != 0
    if tile_scheduler_metadata is None:   # made from the host tensor: no device read
        parts = MS.default_num_sm_parts(q.device, s_q * MS.ROW_TILE if narrow else s_q * h_q, 1)
        tile_scheduler_metadata, num_splits = (t.to(q.device) for t in RM.get_mla_metadata(lens, parts))
    oacc, lacc = MS.split_scratch(b, tile_scheduler_metadata.shape[0], s_q * h_q, RM.HEAD_DIM_V, q.device)
    no_table = torch.zeros((1, cdiv(topk, RM.PAGE_BLOCK_SIZE)), dtype=torch.int32, device=q.device)   # never read
    sparse_args = CM.fp8_tail_args(k_cache, indices, topk_length, attn_sink, topk,
                                   k_cache.shape[0] * RM.PAGE_BLOCK_SIZE)
    common = (CM.q_view(q), CM.kv_view(k_cache), no_table, seqlens, tile_scheduler_metadata, num_splits, out, lse,
              oacc, lacc, record)
    kw = dict(s_q=s_q, h_q=h_q, scale=softmax_scale, causal=False, num_blocks=k_cache.shape[0])
    if narrow:
        decode = CM.narrow_decode_plan(*common, **kw, sparse_tail=sparse_args)
    else:
        dense = CM.decode_plan(*common, **kw, fp8_tail=sparse_args)
        decode = dataclasses.replace(dense, function=SPARSE_DECODE_FUNCTION, shared_bytes=sparse_decode_smem_bytes())
    combine = CM.combine_plan(num_splits, oacc, lacc, out, lse, h_q=h_q)
    combine = dataclasses.replace(combine, function=SPARSE_COMBINE_FUNCTION, args=combine.args + (_opt(attn_sink),))
    return decode, combine


def sparse_decode(q, k_cache, indices, attn_sink, topk_length, tile_scheduler_metadata, num_splits, out, lse,
                  head_dim_v: int, softmax_scale: float, executor: str = "cuda"):
    """Sparse MLA decode into out bf16 [b, s_q, h_q, 512] and lse f32 [b, h_q, s_q] with the
    hand-written kernel; inputs as validated by pykernels.ops.dsa. Returns the emulator's
    Stats of the two launches for executor "emu", else None."""
    from ..runtime import device_errors
    from . import mla as CM
    check_sparse_decode_supported(q, k_cache, head_dim_v)
    if q.shape[0] == 0:
        return [] if executor == "emu" else None
    record = device_errors.record_for(q.device, SPARSE_OP_NAME)
    o = out if CM._out_ok(out) else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    lo = lse if CM._lse_ok(lse) else torch.empty(lse.shape, dtype=lse.dtype, device=lse.device)
    decode, combine = sparse_decode_plans(q, k_cache, indices, attn_sink, topk_length, tile_scheduler_metadata,
                                          num_splits, o, lo, softmax_scale, record)
    stats = [run_plan(decode, executor), run_plan(combine, executor)]   # the combine runs as on the GPU
    if o is not out:
        out.copy_(o)
    if lo is not lse:
        lse.copy_(lo)
    if executor == "emu":   # after both launches: the outputs are what the GPU leaves
        device_errors.raise_if_set(record, SPARSE_OP_NAME)
    return stats if executor == "emu" else None


SPARSE_PREFILL_FUNCTION = "pk_mla_sparse_prefill_bf16"
SPARSE_PREFILL_OP_NAME = "flash_mla_sparse_fwd"     # names the op in a recorded input error
SPARSE_PREFILL_TAIL_ARGS = 4                       # row_bytes, max_logits, its strides (b: u64, h)


def check_sparse_prefill_supported(q, kv, d_v: int) -> None:
    """What the hand-written sparse prefill supports beyond pykernels.ops.dsa's validation
    (ValueError naming the argument): d_qk 576 (512, MODEL1's, is Triton's), d_v 512, h_q a
    multiple of 64 (a CTA's 64 query rows are one token's heads), kv rows 16-byte aligned
    (the producer's 16-byte loads), 32-bit token and row counts."""
    from ..reference import mla as RM
    s_q, h_q, d_qk = q.shape
    if d_qk != RM.HEAD_DIM_QK:
        raise ValueError(f"q: the cuda/emu sparse prefill kernel needs d_qk {RM.HEAD_DIM_QK}, got {d_qk}")
    if d_v != RM.HEAD_DIM_V:
        raise ValueError(f"d_v: the cuda/emu sparse prefill kernel needs {RM.HEAD_DIM_V}, got {d_v}")
    if h_q % 64:
        raise ValueError(f"q: the cuda/emu sparse prefill kernel needs h_q a multiple of 64 (a CTA's 64 query rows "
                         f"are one token's heads), got h_q {h_q}")
    if kv.stride(0) % 8:
        raise ValueError(f"kv: the cuda/emu sparse prefill kernel loads token rows 16 bytes at a time, which needs "
                         f"a row stride that is a multiple of 8 elements, got {kv.stride(0)}")
    if kv.numel() and not torch.compiler.is_compiling() and kv.data_ptr() % 16:
        raise ValueError(f"kv: the cuda/emu sparse prefill kernel loads token rows 16 bytes at a time, which needs "
                         f"a 16-byte aligned data pointer, got {kv.data_ptr():#x}")
    if s_q >= 2**31 or kv.shape[0] >= 2**31:
        raise ValueError(f"q, kv: s_q and s_kv must stay below 2^31, got {s_q} and {kv.shape[0]}")


def sparse_prefill_schedule(s_q: int, topk: int, parts: int, device) -> tuple:
    """(tile_scheduler_metadata int32 [P, 8], num_splits int32 [s_q + 1]) of the sparse prefill,
    made from the shapes alone (no device read): P = min(s_q, parts) partitions of consecutive
    whole query tokens (token i is sequence i of topk slots, one split: max_logits needs no
    combine), as even as integer division makes them."""
    from ..reference import mla as RM
    parts = max(1, min(s_q, parts))
    first = [i * s_q // parts for i in range(parts + 1)]
    nblk = cdiv(topk, RM.PAGE_BLOCK_SIZE)
    rows = [[first[i], 0, first[i + 1] - 1, nblk, first[i], first[i + 1] - first[i], topk, topk]
            for i in range(parts)]
    meta = torch.tensor(rows, dtype=torch.int32).reshape(parts, RM.METADATA_SIZE).to(device)
    return meta, torch.arange(s_q + 1, dtype=torch.int32, device=device)


def sparse_prefill_plan(q, kv, indices, attn_sink, topk_length, out, max_logits, lse, sm_scale: float, record,
                        parts: int = None) -> LaunchPlan:
    """Launch plan of pk_mla_sparse_prefill_bf16: the sparse decode's (decode_plan of
    pykernels/cuda/mla.py) with b = s_q query tokens of one query row group each (q as
    [s_q, h_q, 576]), kv's bf16 rows as the cache, sparse_prefill_schedule over `parts`
    partitions (default: the decode's count for h_q query rows), out / lse / max_logits written
    in place through their strides (out: 8-byte aligned rows; see sparse_prefill)."""
    import dataclasses

    from .. import mla_schedule as MS
    from ..reference import mla as RM
    from . import mla as CM
    s_q, h_q, _ = q.shape
    topk, s_kv = indices.shape[2], kv.shape[0]
    parts = MS.default_num_sm_parts(q.device, h_q, 1) if parts is None else parts
    meta, splits = sparse_prefill_schedule(s_q, topk, parts, q.device)
    seqlens = torch.full((s_q,), topk, dtype=torch.int32, device=q.device)   # topk slots per token
    no_table = torch.zeros((1, cdiv(topk, RM.PAGE_BLOCK_SIZE)), dtype=torch.int32, device=q.device)   # never read
    unsplit = torch.zeros(1, dtype=torch.float32, device=q.device)            # split scratch: never written
    rows2d = kv[:, 0] if s_kv else torch.zeros(RM.PAGE_BLOCK_SIZE, RM.HEAD_DIM_QK, dtype=kv.dtype, device=kv.device)
    plan = CM.decode_plan(CM.q_view(q[:, None]), rows2d, no_table, seqlens, meta, splits, out[:, None],
                          lse[:, :, None], unsplit, unsplit, record, s_q=1, h_q=h_q, scale=sm_scale, causal=False,
                          num_blocks=0)
    tail = CM.fp8_tail_args(rows2d, indices, topk_length, attn_sink, topk, s_kv)
    tail += (u64(kv.stride(0) * kv.element_size()), ptr(max_logits), u64(max_logits.stride(0)),
             u32(max_logits.stride(1)))
    return dataclasses.replace(plan, function=SPARSE_PREFILL_FUNCTION, args=plan.args + tail,
                               shared_bytes=sparse_decode_smem_bytes())


def sparse_prefill(q, kv, indices, attn_sink, topk_length, out, max_logits, lse, sm_scale: float, d_v: int,
                   executor: str = "cuda"):
    """Sparse MLA prefill (flash_mla_sparse_fwd) into out bf16 [s_q, h_q, 512], max_logits and
    lse f32 [s_q, h_q] with the hand-written kernel (the sparse decode's, over kv's bf16 rows);
    inputs as validated by pykernels.ops.dsa. Returns the emulator's Stats for executor "emu",
    else None."""
    from . import mla as CM
    check_sparse_prefill_supported(q, kv, d_v)
    if q.shape[0] == 0:
        return None
    record = device_errors.record_for(q.device, SPARSE_PREFILL_OP_NAME)
    o = out if CM._out_ok(out[:, None]) else torch.empty(out.shape, dtype=out.dtype, device=out.device)   # as 4-D
    fixed = [t if CM._lse_ok(t) else torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (lse, max_logits)]
    stats = _run_checked(sparse_prefill_plan(q, kv, indices, attn_sink, topk_length, o, fixed[1], fixed[0],
                                             sm_scale, record), executor, SPARSE_PREFILL_OP_NAME)
    for got, want in ((o, out), (fixed[0], lse), (fixed[1], max_logits)):
        if got is not want:
            want.copy_(got)
    return stats


__all__ = ["check_logits_supported", "fp8_paged_mqa_logits", "fp8_mqa_logits", "paged_logits_plan",
           "ragged_logits_plan", "smem_bytes", "MODULE", "PAGED_FUNCTIONS", "RAGGED_FUNCTIONS", "check_topk_supported",
           "topk_indices", "paged_topk_indices", "topk_plan", "topk_smem_bytes", "TOPK_MODULE", "sparse_decode",
           "check_sparse_decode_supported", "sparse_decode_smem_bytes", "sparse_decode_plans", "paged_logits_schedule",
           "check_logits_schedule_supported", "rows_per_wgmma", "sparse_prefill", "sparse_prefill_plan",
           "sparse_prefill_schedule", "check_sparse_prefill_supported"]
