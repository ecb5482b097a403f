"""Host side of the hand-written MLA decode kernel and its split-KV combine kernel
(csrc/mla/decode.cu, docs/mla.md).

Inputs are validated by pykernels.mla.flash_mla_with_kvcache; here: what this kernel
supports beyond that (`check_supported`), TMA-compatible views, grid and shared memory
from the metadata, split scratch buffers, tensor maps, argument packing -> LaunchPlans,
run on the GPU ("cuda") or on the PTX emulator ("emu"). No host-device synchronisation:
the combine kernel is always launched (CTAs of sequences with one split return at once).

Two decode instantiations: pk_mla_decode_bf16 (bf16 cache [num_blocks, 64, h_kv, 576]) and
pk_mla_decode_fp8 (the FP8 layout [num_blocks, 64, 1, 656] bytes: 512 e4m3 | 4 f32 scales |
64 bf16 RoPE per token, uint8 or float8_e4m3fn), with the same shared-memory layout; the FP8
entry takes the bf16 entry's parameters (its tmap_kv unused: its producer warpgroup reads the
rows itself) + FP8_TAIL_ARGS more, the sparse decode's (docs/mla.md). Each launch serves one
KV head (the kernel reads one cache column): h_kv > 1 is h_kv decode + combine launch pairs.
At most NARROW_MAX_ROWS (32) query rows per KV head run the narrow kernel instead
(csrc/mla/decode_narrow.cu, `plan_decode` picks): pk_mla_decode_narrow_{bf16,fp8}_n{16,32},
the first 26 parameters above (both caches through tensor maps), the same combine; its sparse
form pk_mla_sparse_decode_narrow_n{16,32} (h_q <= 32, pykernels/cuda/dsa.py) adds the FP8 tail.

Decode parameters, in order: tmap_q, tmap_kv, block_table, seqlens, meta, nsplits, out,
lse, oacc, lacc, s_q, h_q, rows, bt_stride, out strides (b: u64, s, h), lse strides
(b: u64, h, s), causal, scale_log2, err (the device error record), b, num_blocks (the
cache's pages), max_blocks (the block table's columns); FP8 only: indices, cache, topk_length,
sink, idx_sb (u64), idx_ss, topk, num_tokens (fp8_tail_args; the dense decode: the cache and
nulls). Combine: nsplits, oacc, lacc, out, lse, rows, h_q, out strides, lse strides,
max_splits (oacc's rows).

Values the decode kernel checks itself (docs/mla.md "Checks": the metadata against
cache_seqlens, num_splits, page ids and seqlens against the cache and the block table) go
to the device error record (pykernels.runtime.device_errors): raised right after the
launch on the emulator, at the next check_errors() on a GPU (no host read here).
"""
import torch

from .. import mla_schedule as MS
from ..reference import mla as RM
from ..runtime import device_errors
from ..runtime.executors import run_plan
from ..runtime.plan import Arg, LaunchPlan, ptr, ptr_or_null, u32, u64
from ..runtime.tensormap import TensorMapDesc

MODULE = "mla_decode"
OP_NAME = "flash_mla_with_kvcache"     # names the op in a recorded input error
DECODE_FUNCTION = "pk_mla_decode_bf16"
DECODE_FUNCTION_FP8 = "pk_mla_decode_fp8"
COMBINE_FUNCTION = "pk_mla_combine"
THREADS = 384                 # math warpgroups 0, 1 + producer warpgroup 2
TILE_ROWS = 64                # query rows (of the s_q*h_q) per CTA
PAGE = RM.PAGE_BLOCK_SIZE
STAGES = 2
BOX = 64                      # TMA box: 64 rows x 64 bf16 columns (128 bytes, 128B swizzle)
CHUNKS = RM.HEAD_DIM_QK // BOX                # 9 boxes per Q tile or K block
FP8_ROW = RM.FP8_BYTES_PER_TOKEN           # 656 bytes per token
FP8_BOX = (PAGE, FP8_ROW // 16, 16)        # FP8 tmap_kv box [64, 41, 16 bytes] (the narrow kernel's TMA)
FP8_TAIL_ARGS = 8                          # parameters after the bf16 entry's (fp8_tail_args)
COMBINE_ROWS = 4              # query rows (one warp each) per combine CTA
SMEM_LIMIT = 227 * 1024
LOG2E = 1.4426950408889634


def smem_bytes(stages: int = STAGES) -> int:
    """Dynamic shared memory of the decode kernel (Smem<false>::kBytes in decode.cu): 1024
    alignment slack + Q tile (64 x 576 bf16) + `stages` K blocks (64 x 576 bf16; a block's P,
    64 x 64 bf16, goes to its RoPE chunk once Q.K^T has read it: no P tile) + the published
    row maxima and the row sums (2 x 2 x 64 f32) + mbarriers: one per 64-column chunk of each
    stage (full), one per stage (empty), Q full and empty."""
    tile = TILE_ROWS * RM.HEAD_DIM_QK * 2
    return 1024 + tile * (1 + stages) + 2 * 2 * 64 * 4 + 8 * (stages * CHUNKS + stages + 2)


SMEM_BYTES = smem_bytes()
SMEM_BYTES_FP8 = SMEM_BYTES      # the FP8 cache's producer converts into the same bf16 K ring
assert SMEM_BYTES <= SMEM_LIMIT

# The narrow kernel (csrc/mla/decode_narrow.cu, docs/mla.md "The narrow kernel"): at most 32
# query rows per KV head, as wgmma's N (16 or 32) with the keys / value columns as M.
NARROW_MODULE = "mla_decode_narrow"
NARROW_MAX_ROWS = 32
NARROW_THREADS = 160          # one math warpgroup + the producer warp


def narrow_tile_rows(rows: int) -> int:
    """N of the narrow kernel for `rows` = s_q * h_q / h_kv query rows (16 or 32), 0 when the
    64-row kernel takes them."""
    return 0 if rows > NARROW_MAX_ROWS else (16 if rows <= 16 else 32)


def narrow_smem_bytes(n: int, fp8: bool, sparse: bool = False) -> int:
    """Dynamic shared memory of the narrow kernel (Layout<N, kFp8, kSparse>::kBytes in
    decode_narrow.cu): 1024 alignment slack + Q (9 chunks of n x 64 bf16) + bf16: 2 K stages
    (64 x 576 bf16); FP8: one bf16 K block + 3 (n = 16) or 2 raw pages + the P tile (n x 64
    bf16) + row maxima (2 x 4 x n f32) + row sums (4 x n f32) + 2 mbarriers per stage + 2;
    sparse (FP8): + a u64 used-slot mask per stage."""
    tile = PAGE * RM.HEAD_DIM_QK * 2
    stages = 3 if fp8 and n == 16 else 2
    ring = tile + stages * PAGE * FP8_ROW if fp8 else stages * tile
    masks = 8 * stages if sparse else 0
    return 1024 + n * RM.HEAD_DIM_QK * 2 + ring + n * 64 * 2 + 3 * 4 * n * 4 + 8 * (2 * stages + 2) + masks


def narrow_function(n: int, fp8: bool, sparse: bool = False) -> str:
    if sparse:
        return f"pk_mla_sparse_decode_narrow_n{n}"
    return f"pk_mla_decode_narrow_{'fp8' if fp8 else 'bf16'}_n{n}"


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def check_supported(q, k_cache, head_dim_v: int = RM.HEAD_DIM_V) -> None:
    """What the hand-written kernel supports beyond pykernels.mla's validation (ValueError /
    TypeError naming the argument): a bf16 cache or the FP8 layout (uint8 / float8_e4m3fn,
    656 bytes per token), head dims 576 / 512, a 16-byte aligned cache (TMA), TMA's 32-bit
    coordinates."""
    fp8 = RM.is_fp8_cache(k_cache)
    if k_cache.dtype != torch.bfloat16 and not fp8:
        raise TypeError(f"k_cache: the cuda/emu MLA kernel supports dtype bfloat16 (or uint8 / float8_e4m3fn "
                        f"in the FP8 layout of {FP8_ROW} bytes per token), got "
                        f"{str(k_cache.dtype).replace('torch.', '')} with last dim {k_cache.shape[-1]}")
    if q.dtype != torch.bfloat16:
        raise TypeError(f"q: the cuda/emu MLA kernel supports dtype bfloat16 only, got "
                        f"{str(q.dtype).replace('torch.', '')}")
    if q.shape[-1] != RM.HEAD_DIM_QK or (not fp8 and k_cache.shape[-1] != RM.HEAD_DIM_QK):
        raise ValueError(f"q, k_cache: the cuda/emu MLA kernel needs head dim {RM.HEAD_DIM_QK}, got "
                         f"{q.shape[-1]} and {k_cache.shape[-1]}")
    if head_dim_v != RM.HEAD_DIM_V:
        raise ValueError(f"head_dim_v: the cuda/emu MLA kernel needs {RM.HEAD_DIM_V}, got {head_dim_v}")
    if k_cache.shape[1] != PAGE:
        raise ValueError(f"k_cache: the cuda/emu MLA kernel needs pages of {PAGE} tokens, "
                         f"got shape {list(k_cache.shape)}")
    # (while torch.compile traces there is no pointer: the op's implementation checks it)
    if k_cache.numel() and not torch.compiler.is_compiling() and k_cache.data_ptr() % 16:
        raise ValueError(f"k_cache: the cuda/emu MLA kernel reads the cache with TMA, which needs a "
                         f"16-byte aligned data pointer, got {k_cache.data_ptr():#x}")
    if k_cache.shape[0] * PAGE >= 2**31:
        raise ValueError(f"k_cache: TMA coordinates are 32-bit: num_blocks * {PAGE} must stay below 2^31, "
                         f"got {k_cache.shape[0]} blocks")
    b, s_q, h_q = q.shape[:3]
    if s_q * h_q >= 2**31 or b >= 2**31:
        raise ValueError(f"q: s_q * h_q and b must stay below 2^31, got shape {list(q.shape)}")


def _tma_ready(t: torch.Tensor) -> bool:
    return (t.data_ptr() % 16 == 0 and t.stride(-1) == 1
            and all(s % 8 == 0 for s in t.stride()[:-1]))   # bf16: 16-byte strides


def q_view(q: torch.Tensor) -> torch.Tensor:
    """q [b, s_q, h_q, 576] as [b, s_q*h_q, 576] with TMA-legal strides (a copy only when
    the token and head dims cannot be merged or the strides / pointer are not 16-byte aligned)."""
    b, s_q, h_q, d = q.shape
    q3 = q.reshape(b, s_q * h_q, d)
    if not _tma_ready(q3):
        q3 = q3.contiguous()
        if not _tma_ready(q3):          # contiguous but misaligned: a fresh allocation is aligned
            q3 = q3.clone()
    return q3


def _u32_strides(t: torch.Tensor, first_u64: bool) -> bool:
    s = t.stride()
    return all(0 <= x < 2**32 for x in s[1:]) and (first_u64 or s[0] < 2**32)


def _out_ok(out: torch.Tensor) -> bool:
    # the kernels store bf16 pairs (decode) and quads (combine): 8-byte aligned rows
    return out.data_ptr() % 8 == 0 and all(s % 4 == 0 for s in out.stride()[:3]) and _u32_strides(out, True)


def _lse_ok(lse: torch.Tensor) -> bool:
    return lse.data_ptr() % 4 == 0 and _u32_strides(lse, True)


def kv_view(k_cache: torch.Tensor, head: int = 0) -> torch.Tensor:
    """KV head `head` of the cache as the decode kernel's tensor map sees it: bf16
    [num_blocks * 64, 576], or for the FP8 layout uint8 [num_blocks * 64, 41, 16] (one page
    = one 64 x 41 x 16-byte box; TMA boxes are at most 256 elements a side). A view, no
    copy: with h_kv heads a token row's stride is h_kv rows (h_kv * 1152 or h_kv * 656
    bytes, multiples of 16 as TMA needs). A cache with no pages becomes one page of zeros
    (a tensor map needs a non-empty tensor; no block is ever read then)."""
    one_head = k_cache[:, :, head]                      # [num_blocks, 64, 576 | 656]
    if RM.is_fp8_cache(k_cache):
        kv = one_head.view(torch.uint8).view(-1, FP8_ROW // 16, 16)
        if kv.shape[0] == 0:
            kv = torch.zeros(PAGE, FP8_ROW // 16, 16, dtype=torch.uint8, device=k_cache.device)
        return kv
    kv = one_head.view(-1, RM.HEAD_DIM_QK)
    if kv.shape[0] == 0:
        kv = torch.zeros(PAGE, RM.HEAD_DIM_QK, dtype=k_cache.dtype, device=k_cache.device)
    return kv


def _decode_args(q3, q_box_rows, kv2d, block_table, seqlens, meta, num_splits, out, lse, oacc, lacc, record,
                 s_q, h_q, scale, causal, num_blocks) -> tuple:
    """The 26 parameters every MLA decode entry starts with (64-row and narrow, bf16 and FP8):
    the Q tensor map (boxes of q_box_rows rows x 64 columns, 128-byte swizzle), the cache's (bf16:
    64 x 64 boxes, 128-byte swizzle; FP8: one page per box, no swizzle), then the pointers,
    sizes and strides."""
    b, rows, _ = q3.shape
    tmap_q = TensorMapDesc(q3, (1, q_box_rows, BOX), swizzle=128)
    if kv2d.dtype == torch.uint8:
        tmap_kv = TensorMapDesc(kv2d, FP8_BOX, swizzle=0)
    else:
        tmap_kv = TensorMapDesc(kv2d, (PAGE, BOX), swizzle=128)
    return (Arg("tensormap", tmap_q), Arg("tensormap", tmap_kv),
            ptr(block_table), ptr(seqlens), ptr(meta), ptr(num_splits), ptr(out), ptr(lse), ptr(oacc), ptr(lacc),
            u32(s_q), u32(h_q), u32(rows), u32(block_table.stride(0)),
            u64(out.stride(0)), u32(out.stride(1)), u32(out.stride(2)),
            u64(lse.stride(0)), u32(lse.stride(1)), u32(lse.stride(2)),
            u32(int(causal)), Arg("f32", float(scale) * LOG2E),
            ptr(record), u32(b), u32(num_blocks), u32(block_table.shape[1]))


def decode_plan(q3, kv2d, block_table, seqlens, meta, num_splits, out, lse, oacc, lacc, record, *,
                s_q: int, h_q: int, scale: float, causal: bool, num_blocks: int, fp8_tail=None) -> LaunchPlan:
    """Launch plan of pk_mla_decode_bf16 (kv2d bf16 [num_blocks * 64, 576]) or
    pk_mla_decode_fp8 (kv2d = kv_view of an FP8 cache, uint8 [num_blocks * 64, 41, 16]):
    grid (num_sm_parts, ceil(s_q*h_q / 64)), 384 threads, SMEM_BYTES / SMEM_BYTES_FP8 of
    dynamic shared memory. q3 [b, rows, 576] bf16 and the bf16 cache are read by TMA (64 x 64
    boxes, 128-byte swizzle; q rows past `rows` are zero-filled); the FP8 cache one page per
    box (64 x 41 x 16 bytes, no swizzle; unused: the FP8 kernel reads the rows through its
    `cache` pointer). record: the int32 device error record; num_blocks: the cache's pages
    (kv2d may hold a dummy page when there are none); fp8_tail: the FP8 entry's last
    FP8_TAIL_ARGS arguments (default fp8_tail_args(kv2d): the dense decode's)."""
    rows = q3.shape[1]
    parts = meta.shape[0]
    fp8 = kv2d.dtype == torch.uint8
    args = _decode_args(q3, TILE_ROWS, kv2d, block_table, seqlens, meta, num_splits, out, lse, oacc, lacc, record,
                        s_q, h_q, scale, causal, num_blocks)
    if fp8:
        args += fp8_tail if fp8_tail is not None else fp8_tail_args(kv2d)
    return LaunchPlan(MODULE, DECODE_FUNCTION_FP8 if fp8 else DECODE_FUNCTION,
                      grid=(parts, _cdiv(rows, TILE_ROWS), 1), block=(THREADS, 1, 1),
                      args=args, shared_bytes=SMEM_BYTES_FP8 if fp8 else SMEM_BYTES)


def narrow_decode_plan(q3, kv2d, block_table, seqlens, meta, num_splits, out, lse, oacc, lacc, record, *,
                       s_q: int, h_q: int, scale: float, causal: bool, num_blocks: int, fp8_tail=None,
                       sparse_tail=None) -> LaunchPlan:
    """Launch plan of the narrow kernel for rows = s_q * h_q <= 32 (q3 [b, rows, 576]):
    pk_mla_decode_narrow_{bf16|fp8}_n{N}, N = narrow_tile_rows(rows), grid (num_sm_parts, 1),
    NARROW_THREADS threads, narrow_smem_bytes(N, fp8). decode_plan's first 26 parameters (the
    FP8 entry too: no fp8_tail, which is accepted and ignored); Q boxes of N rows x 64 columns
    (128-byte swizzle; rows past `rows` zero-filled), bf16 cache boxes of 64 x 64, the FP8
    cache one page per box (64 x 41 x 16 bytes). sparse_tail (the sparse decode's
    fp8_tail_args; FP8 cache, h_q <= 32): pk_mla_sparse_decode_narrow_n{N}, N =
    narrow_tile_rows(h_q) (a CTA's rows are one query token's heads), grid (num_sm_parts, s_q),
    those 26 parameters + sparse_tail."""
    rows = q3.shape[1]
    sparse = sparse_tail is not None
    n = narrow_tile_rows(h_q if sparse else rows)
    if not n:
        raise ValueError(f"q: the narrow MLA kernel takes at most {NARROW_MAX_ROWS} query rows per KV head"
                         f"{' (sparse: per query token)' if sparse else ''}, got {h_q if sparse else rows}")
    fp8 = kv2d.dtype == torch.uint8
    args = _decode_args(q3, n, kv2d, block_table, seqlens, meta, num_splits, out, lse, oacc, lacc, record,
                        s_q, h_q, scale, causal, num_blocks)
    if sparse:
        args += tuple(sparse_tail)
    return LaunchPlan(NARROW_MODULE, narrow_function(n, fp8, sparse), grid=(meta.shape[0], s_q if sparse else 1, 1),
                      block=(NARROW_THREADS, 1, 1), args=args, shared_bytes=narrow_smem_bytes(n, fp8, sparse))


def plan_decode(q3, kv2d, *args, **kwargs) -> LaunchPlan:
    """The decode launch the dispatch picks: the narrow kernel for at most NARROW_MAX_ROWS
    query rows per KV head, else the 64-row kernel (same arguments as decode_plan)."""
    narrow = narrow_tile_rows(q3.shape[1])
    return (narrow_decode_plan if narrow else decode_plan)(q3, kv2d, *args, **kwargs)


def fp8_tail_args(cache, indices=None, topk_length=None, attn_sink=None, topk: int = 0,
                  num_tokens: int = 0) -> tuple:
    """The FP8 entries' last FP8_TAIL_ARGS parameters: indices, cache (its bytes), topk_length,
    sink, idx_sb, idx_ss, topk, num_tokens; the dense decode passes the cache alone (nulls, 0)."""
    strides = (indices.stride(0), indices.stride(1)) if indices is not None else (0, 0)
    return (ptr_or_null(indices), ptr(cache), ptr_or_null(topk_length), ptr_or_null(attn_sink), u64(strides[0]),
            u32(strides[1]), u32(topk), u32(num_tokens))


def combine_plan(num_splits, oacc, lacc, out, lse, *, h_q: int) -> LaunchPlan:
    """Launch plan of pk_mla_combine: grid (b, ceil(rows / 4)), 128 threads (a warp per row);
    chained to the decode launch before it with PDL (its CTAs start as the decode's finish and
    wait for the decode's scratch with griddepcontrol.wait)."""
    b = num_splits.shape[0] - 1
    rows = oacc.shape[1]
    args = (ptr(num_splits), ptr(oacc), ptr(lacc), ptr(out), ptr(lse), u32(rows), u32(h_q),
            u64(out.stride(0)), u32(out.stride(1)), u32(out.stride(2)),
            u64(lse.stride(0)), u32(lse.stride(1)), u32(lse.stride(2)), u32(oacc.shape[0]))
    return LaunchPlan(MODULE, COMBINE_FUNCTION, grid=(b, _cdiv(rows, COMBINE_ROWS), 1), block=(128, 1, 1),
                      args=args, pdl=True)


def head_plans(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, out, lse,
               scale: float, causal: bool, record) -> list:
    """[(decode plan, combine plan)] of flash_mla_with_kvcache, one pair per KV head j (its
    query heads [j, j + 1) * h_q / h_kv; the decode kernel plan_decode picks), sharing the
    schedule and one split scratch; out / lse: stride-ready (_out_ok / _lse_ok). What the
    call runs and what pykernels.explain describes."""
    b, s_q, h_q, _ = q.shape
    h_kv = k_cache.shape[2]
    g = h_q // h_kv                                 # query heads per KV head
    oacc, lacc = MS.split_scratch(b, tile_scheduler_metadata.shape[0], s_q * g, RM.HEAD_DIM_V, q.device)
    plans = []
    for j in range(h_kv):
        heads = slice(j * g, (j + 1) * g)
        o_j, l_j = out[:, :, heads], lse[:, heads]
        plans.append((plan_decode(q_view(q[:, :, heads]), kv_view(k_cache, j), block_table, cache_seqlens,
                                  tile_scheduler_metadata, num_splits, o_j, l_j, oacc, lacc, record,
                                  s_q=s_q, h_q=g, scale=scale, causal=causal, num_blocks=k_cache.shape[0]),
                      combine_plan(num_splits, oacc, lacc, o_j, l_j, h_q=g)))
    return plans


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                           out, lse, head_dim_v=RM.HEAD_DIM_V, softmax_scale=None, causal=False,
                           executor: str = "cuda"):
    """Split-KV MLA decode into out bf16 [b, s_q, h_q, 512] and lse f32 [b, h_q, s_q] with the
    hand-written kernel; inputs as validated by pykernels.mla.flash_mla_with_kvcache
    (k_cache [num_blocks, 64, h_kv, 576 | 656], h_kv dividing h_q).

    KV head j and its query heads [j, j + 1) * h_q / h_kv run as one decode launch and one
    combine launch of their own (in order, on one stream, sharing the schedule and the
    split scratch): the cache as a strided view (kv_view), q's head group copied to a
    TMA-legal [b, s_q * h_q / h_kv, 576] when its token and head dims do not merge, out and
    lse written in place through their strides. Returns the emulator's Stats of the
    2 * h_kv launches (decode, combine per KV head) for executor "emu", else None."""
    check_supported(q, k_cache, head_dim_v)
    if tile_scheduler_metadata.shape[0] < 1:
        raise ValueError(f"tile_scheduler_metadata: expected at least one row, got shape "
                         f"{list(tile_scheduler_metadata.shape)}")
    if q.shape[0] == 0:
        return [] if executor == "emu" else None
    record = device_errors.record_for(q.device, OP_NAME)
    scale = RM.default_softmax_scale() if softmax_scale is None else float(softmax_scale)
    o = out if _out_ok(out) else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    l = lse if _lse_ok(lse) else torch.empty(lse.shape, dtype=lse.dtype, device=lse.device)
    stats = []
    for decode, combine in head_plans(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                                      o, l, scale, causal, record):
        stats.append(run_plan(decode, executor))
        if executor == "emu":
            device_errors.raise_if_set(record, OP_NAME)
        stats.append(run_plan(combine, executor))
    if o is not out:
        out.copy_(o)
    if l is not lse:
        lse.copy_(l)
    return stats if executor == "emu" else None


__all__ = ["check_supported", "kv_view", "decode_plan", "head_plans",
           "narrow_decode_plan", "plan_decode", "narrow_tile_rows",
           "narrow_smem_bytes", "narrow_function", "NARROW_MODULE", "NARROW_MAX_ROWS", "combine_plan",
           "flash_mla_with_kvcache", "smem_bytes",
           "fp8_tail_args", "FP8_TAIL_ARGS", "SMEM_BYTES", "SMEM_BYTES_FP8", "MODULE", "DECODE_FUNCTION",
           "DECODE_FUNCTION_FP8", "COMBINE_FUNCTION"]
