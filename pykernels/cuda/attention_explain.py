"""What pykernels.explain prints about an MLA decode / sparse decode kernel launch
(Backend.describe): the plans the call would launch, built by the same functions the call
uses (cuda/mla.py head_plans, cuda/dsa.py sparse_decode_plans), and why that kernel: the
query rows per CTA (narrow n16 / n32 for at most NARROW_MAX_ROWS, else the 64-row kernel),
the cache format, and the split-KV schedule the metadata describes (read on the host:
explain is a diagnostic, never on a call's path)."""
import torch

from .. import mla_schedule as MS
from ..reference import mla as RM
from ..runtime import device_errors
from . import mla as CM


def _plan_line(what: str, plan) -> str:
    return (f"{what}: {plan.function}, grid {'x'.join(map(str, plan.grid))}, {plan.block[0]} threads, "
            f"{plan.shared_bytes} bytes shared memory")


def _kernel_reason(rows: int, fp8: bool, per: str) -> str:
    n = CM.narrow_tile_rows(rows)
    cache = "FP8 cache (656-byte tokens, dequantized to bf16 in shared memory)" if fp8 else "bf16 cache"
    if n:
        return (f"why: {rows} query rows {per} <= NARROW_MAX_ROWS {CM.NARROW_MAX_ROWS}: the narrow kernel, the rows "
                f"as wgmma N = {n} (keys as M, one math warpgroup); {cache}")
    return (f"why: {rows} query rows {per} > NARROW_MAX_ROWS {CM.NARROW_MAX_ROWS}: the 64-row kernel, "
            f"{-(-rows // CM.TILE_ROWS)} row tiles of {CM.TILE_ROWS} (two math warpgroups in seesaw); {cache}")


def _schedule_lines(meta: torch.Tensor, num_splits: torch.Tensor, default_parts, made: str) -> list:
    meta, splits = meta.cpu(), num_splits.cpu().long()
    per_seq = (splits[1:] - splits[:-1]).tolist()
    default = f"; get_mla_metadata's default here: {default_parts}" if default_parts else ""
    lines = [f"schedule: {meta.shape[0]} SM partitions (tile_scheduler_metadata rows{made}{default}), "
             "the decode grid's first dimension: each walks its rows' KV blocks"]
    if per_seq:
        split = sum(s > 1 for s in per_seq)
        lines.append(f"  splits per sequence {min(per_seq)}..{max(per_seq)}, {split} of {len(per_seq)} sequences "
                     f"split (their pieces merged by the combine), {int(splits[-1])} pieces in all; "
                     f"pieces per partition {int(meta[:, MS.NUM_PIECES].min())}..{int(meta[:, MS.NUM_PIECES].max())}")
    return lines


def mla_decode_choice(p) -> list:
    """Lines for one flash_mla_with_kvcache problem (ops.mla.DecodeProblem)."""
    b, s_q, h_q, _ = p.q.shape
    if b == 0:
        return ["launch: none (b = 0)"]
    record = device_errors.record_for(p.q.device, CM.OP_NAME)
    plans = CM.head_plans(p.q, p.k_cache, p.block_table, p.cache_seqlens, p.tile_scheduler_metadata, p.num_splits,
                          p.out, p.softmax_lse, p.softmax_scale, p.causal, record)
    decode, combine = plans[0]
    h_kv = p.h_kv
    each = f" (x {h_kv} KV heads: one decode + combine pair each)" if h_kv > 1 else ""
    rows = s_q * h_q // h_kv
    return ([_plan_line("launch", decode) + each, _plan_line("then", combine),
             _kernel_reason(rows, p.fp8, f"per KV head (s_q {s_q} x {h_q // h_kv} heads)")]
            + _schedule_lines(p.tile_scheduler_metadata, p.num_splits,
                              MS.default_num_sm_parts(p.device, rows, h_kv), ""))


def sparse_decode_choice(p) -> list:
    """Lines for one flash_mla_sparse_decode problem (ops.dsa.SparseDecodeProblem)."""
    from . import dsa as CD
    b, s_q, h_q, _ = p.q.shape
    if b == 0:
        return ["launch: none (b = 0)"]
    record = device_errors.record_for(p.q.device, CD.SPARSE_OP_NAME)
    decode, combine = CD.sparse_decode_plans(p.q, p.k_cache, p.indices, p.attn_sink, p.topk_length,
                                             p.tile_scheduler_metadata, p.num_splits, p.out, p.softmax_lse,
                                             p.softmax_scale, record)
    topk = p.indices.shape[2]
    meta, splits = p.tile_scheduler_metadata, p.num_splits
    made = ""
    if meta is None:      # as sparse_decode_plans makes it: topk tokens per sequence, the default partitions
        parts = decode.grid[0]
        meta, splits = RM.get_mla_metadata(torch.full((b,), topk, dtype=torch.int32), parts)
        made = ", made by the call: none given"
    narrow = CM.narrow_tile_rows(h_q) != 0
    per = "per CTA (one query token's heads)" if narrow else f"(s_q {s_q} x h_q {h_q})"
    rows = h_q if narrow else s_q * h_q
    return ([_plan_line("launch", decode), _plan_line("then", combine), _kernel_reason(rows, True, per),
             f"  every sequence is scheduled as topk = {topk} slots"]
            + _schedule_lines(meta, splits, None, made))
