"""MLA decode ops (FlashMLA's call forms): problems, backends, custom ops.

get_mla_metadata: cache_seqlens int32 [b] -> (tile_scheduler_metadata int32
[num_sm_parts, 8], num_splits int32 [b + 1]).
flash_mla_with_kvcache: q bf16 [b, s_q, h_q, 576]; k_cache bf16 [num_blocks, 64, h_kv, 576]
(h_kv dividing h_q: query head h reads KV head h // (h_q / h_kv)) or the FP8 layout uint8 /
float8_e4m3fn [num_blocks, 64, 1, 656]; block_table int32 [b, max_blocks]; cache_seqlens
int32 [b] -> out bf16 [b, s_q, h_q, 512] and softmax_lse float32 [b, h_q, s_q], written in
place.
"""
import dataclasses
import math
import numbers

import torch

from .. import registry
from ..mla_schedule import check_schedule
from ..reference import mla as RM
from ..runtime import device_errors as DE
from ..runtime import validate as V
from . import backends as B

MAX_SM_PARTS = 1 << 16          # metadata rows: far above any GPU's SM count
MAX_SEQLEN = (1 << 31) - 1      # int32 cache_seqlens


# --- get_mla_metadata -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MetadataProblem:
    cache_seqlens: torch.Tensor
    num_sm_parts: int

    @property
    def device(self):
        return self.cache_seqlens.device

    def describe(self) -> str:
        return f"b={self.cache_seqlens.shape[0]} num_sm_parts={self.num_sm_parts} on {self.device}"


def _check_seqlen_values(seqlens: torch.Tensor, hi: int = MAX_SEQLEN) -> None:
    if seqlens.device.type != "cpu" or seqlens.numel() == 0 or V.is_fake(seqlens):
        return
    lo_v, hi_v = int(seqlens.min()), int(seqlens.max())
    if lo_v < 0 or hi_v > hi:
        bad = lo_v if lo_v < 0 else hi_v
        raise ValueError(f"cache_seqlens: expected values in [0, {hi}], got {bad}")


def metadata_problem(cache_seqlens, num_sm_parts) -> MetadataProblem:
    seqlens = V.as_tensor("cache_seqlens", cache_seqlens)
    V.check_dtype("cache_seqlens", seqlens, torch.int32)
    V.check_rank("cache_seqlens", seqlens, 1)
    V.check_contiguous("cache_seqlens", seqlens)
    parts = V.check_int("num_sm_parts", num_sm_parts, lo=1, hi=MAX_SM_PARTS)
    _check_seqlen_values(seqlens)
    return MetadataProblem(seqlens, parts)


def _metadata_outputs(p: MetadataProblem):
    return (p.cache_seqlens.new_empty((p.num_sm_parts, RM.METADATA_SIZE)),
            p.cache_seqlens.new_empty((p.cache_seqlens.shape[0] + 1,)))


METADATA = registry.op("get_mla_metadata", metadata_problem)
METADATA.add(B.triton(lambda p: _triton().get_mla_metadata(p.cache_seqlens, p.num_sm_parts)))
METADATA.add(B.reference(lambda p: RM.get_mla_metadata(p.cache_seqlens, p.num_sm_parts)))


def get_mla_metadata_body(cache_seqlens: torch.Tensor, num_sm_parts: int,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return METADATA(metadata_problem(cache_seqlens, num_sm_parts), backend)


get_mla_metadata_op = torch.library.custom_op("pykernels::get_mla_metadata", mutates_args=())(get_mla_metadata_body)


@get_mla_metadata_op.register_fake
def _(cache_seqlens, num_sm_parts, backend):
    return _metadata_outputs(metadata_problem(cache_seqlens, num_sm_parts))


# --- flash_mla_with_kvcache --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DecodeProblem:
    q: torch.Tensor
    k_cache: torch.Tensor
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    tile_scheduler_metadata: torch.Tensor
    num_splits: torch.Tensor
    out: torch.Tensor
    softmax_lse: torch.Tensor
    head_dim_v: int
    softmax_scale: float
    causal: bool
    device: torch.device

    @property
    def h_kv(self) -> int:
        return self.k_cache.shape[2]

    @property
    def fp8(self) -> bool:
        return RM.is_fp8_cache(self.k_cache)

    def describe(self) -> str:
        b, s_q, h_q, _ = self.q.shape
        cache = "fp8" if self.fp8 else "bf16"
        return (f"b={b} s_q={s_q} h_q={h_q} h_kv={self.h_kv} {cache} cache of {self.k_cache.shape[0]} pages "
                f"on {self.device}")


def _check_cache(k_cache, h_q: int):
    """k_cache: bf16 [num_blocks, 64, h_kv, 576] with h_kv dividing h_q, or the FP8 layout
    [num_blocks, 64, 1, 656] (FlashMLA's FP8 cache has one KV head); contiguous."""
    V.check_rank("k_cache", k_cache, 4)
    if k_cache.dtype == torch.bfloat16:
        d = RM.HEAD_DIM_QK
    elif k_cache.dtype in (torch.uint8, torch.float8_e4m3fn):
        d = RM.FP8_BYTES_PER_TOKEN
    else:
        raise TypeError(f"k_cache: expected dtype bfloat16 (or uint8 / float8_e4m3fn in the FP8 "
                        f"layout), got {str(k_cache.dtype).replace('torch.', '')}")
    if k_cache.shape[1] != RM.PAGE_BLOCK_SIZE:
        raise ValueError(f"k_cache: expected page block size {RM.PAGE_BLOCK_SIZE} (dim 1), "
                         f"got {k_cache.shape[1]} in shape {list(k_cache.shape)}")
    h_kv = k_cache.shape[2]
    if d == RM.FP8_BYTES_PER_TOKEN and h_kv != 1:
        raise ValueError(f"k_cache: expected h_kv = 1 (dim 2) for the FP8 layout (FlashMLA's FP8 cache has one "
                         f"KV head), got {h_kv} in shape {list(k_cache.shape)}")
    if h_kv < 1 or h_q % h_kv:
        raise ValueError(f"k_cache: expected h_kv (dim 2) >= 1 dividing h_q = {h_q} (q's heads; query head h "
                         f"reads KV head h // (h_q / h_kv)), got {h_kv} in shape {list(k_cache.shape)}")
    if k_cache.shape[3] != d:
        raise ValueError(f"k_cache: expected last dim {d} for dtype {str(k_cache.dtype).replace('torch.', '')}"
                         f", got {k_cache.shape[3]} in shape {list(k_cache.shape)}")
    V.check_contiguous("k_cache", k_cache)


def _check_device_values(p: DecodeProblem) -> None:
    """Host checks of block_table / cache_seqlens values and of the schedule against the
    seqlens (CPU tensors; on a GPU the kernels check them into the device error record,
    in the same words)."""
    page = RM.PAGE_BLOCK_SIZE
    coverage = p.block_table.shape[1] * page
    lens = p.cache_seqlens.long()
    bad = (lens < 0) | (lens > coverage)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(DE.describe("SeqlenOutOfRange", int(lens[i]), coverage, i))
    used = torch.arange(p.block_table.shape[1], device=lens.device)[None, :] < ((lens + page - 1) // page)[:, None]
    num_blocks = p.k_cache.shape[0]
    bad = used & ((p.block_table < 0) | (p.block_table >= num_blocks))
    if bool(bad.any()):
        i, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(DE.describe("BlockTableOutOfRange", int(p.block_table[i, j]), num_blocks, i))
    check_schedule(p.tile_scheduler_metadata, p.num_splits, p.cache_seqlens)


def check_scalars(head_dim_v, softmax_scale, causal) -> float:
    """head_dim_v 512; softmax_scale None (576 ** -0.5) or a positive finite float; causal a
    bool. Returns the softmax scale."""
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, numbers.Integral) or head_dim_v != RM.HEAD_DIM_V:
        raise ValueError(f"head_dim_v: expected {RM.HEAD_DIM_V}, got {head_dim_v!r}")
    if softmax_scale is None:
        softmax_scale = RM.default_softmax_scale()
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real) \
            or not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale: expected None or a positive finite float, got {softmax_scale!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    return float(softmax_scale)


def check_q(q: torch.Tensor):
    """q: bf16 [b, s_q, h_q, 576] with unit stride in the last dim; returns (b, s_q, h_q)."""
    V.check_dtype("q", q, torch.bfloat16)
    V.check_rank("q", q, 4)
    b, s_q, h_q, d = q.shape
    if d != RM.HEAD_DIM_QK:
        raise ValueError(f"q: expected head dim {RM.HEAD_DIM_QK} (last dim), got {d} in shape {list(q.shape)}")
    if s_q < 1 or h_q < 1:
        raise ValueError(f"q: expected s_q >= 1 and h_q >= 1, got shape {list(q.shape)}")
    V.check_inner_contiguous("q", q)
    return b, s_q, h_q


def decode_problem(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                   out, softmax_lse, head_dim_v, softmax_scale, causal, *, values=True) -> DecodeProblem:
    """Validate one decode call (every error names the argument, what was expected and
    what was given). values: also check block_table / cache_seqlens / metadata values on
    CPU tensors."""
    q = V.as_tensor("q", q)
    k_cache = V.as_tensor("k_cache", k_cache)
    block_table = V.as_tensor("block_table", block_table)
    cache_seqlens = V.as_tensor("cache_seqlens", cache_seqlens)
    meta = V.as_tensor("tile_scheduler_metadata", tile_scheduler_metadata)
    num_splits = V.as_tensor("num_splits", num_splits)
    out = V.as_tensor("out", out)
    lse = V.as_tensor("softmax_lse", softmax_lse)

    b, s_q, h_q = check_q(q)
    _check_cache(k_cache, h_q)
    V.check_dtype("block_table", block_table, torch.int32)
    V.check_rank("block_table", block_table, 2)
    V.check_shape("block_table", block_table, (b, None))
    V.check_contiguous("block_table", block_table)
    V.check_dtype("cache_seqlens", cache_seqlens, torch.int32)
    V.check_shape("cache_seqlens", cache_seqlens, (b,))
    V.check_contiguous("cache_seqlens", cache_seqlens)
    V.check_dtype("tile_scheduler_metadata", meta, torch.int32)
    V.check_shape("tile_scheduler_metadata", meta, (None, RM.METADATA_SIZE))
    if meta.shape[0] < 1:
        raise ValueError(f"tile_scheduler_metadata: expected at least one row, got shape {list(meta.shape)}")
    V.check_contiguous("tile_scheduler_metadata", meta)
    V.check_dtype("num_splits", num_splits, torch.int32)
    V.check_shape("num_splits", num_splits, (b + 1,))
    V.check_contiguous("num_splits", num_splits)
    softmax_scale = check_scalars(head_dim_v, softmax_scale, causal)
    V.check_dtype("out", out, torch.bfloat16)
    V.check_shape("out", out, (b, s_q, h_q, RM.HEAD_DIM_V))
    V.check_inner_contiguous("out", out)
    V.check_dtype("softmax_lse", lse, torch.float32)
    V.check_shape("softmax_lse", lse, (b, h_q, s_q))
    dev = V.check_same_device(q=q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens,
                              tile_scheduler_metadata=meta, num_splits=num_splits, out=out, softmax_lse=lse)
    p = DecodeProblem(q, k_cache, block_table, cache_seqlens, meta, num_splits, out, lse,
                      int(head_dim_v), float(softmax_scale), causal, dev)
    if not V.is_fake(out):
        inputs = dict(q=q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens,
                      tile_scheduler_metadata=meta, num_splits=num_splits)
        V.check_no_overlap("out", out, **inputs)
        V.check_no_overlap("softmax_lse", lse, out=out, **inputs)
        if values and dev.type == "cpu":
            _check_device_values(p)
    return p


def _reference(p: DecodeProblem):
    if p.device.type != "cpu":
        _check_device_values(p)          # ground truth may read values on the host
    # The reference ignores the schedule (it is ground truth for any schedule).
    o, lse = RM.flash_mla_with_kvcache(p.q, p.k_cache, p.block_table, p.cache_seqlens, p.head_dim_v,
                                       p.softmax_scale, p.causal)
    p.out.copy_(o)
    p.softmax_lse.copy_(lse)


def _args(p: DecodeProblem):
    return (p.q, p.k_cache, p.block_table, p.cache_seqlens, p.tile_scheduler_metadata, p.num_splits,
            p.out, p.softmax_lse, p.head_dim_v, p.softmax_scale, p.causal)


def _triton():
    from ..triton import mla as TM
    return TM


def _kernel(p: DecodeProblem, executor: str):
    from ..cuda import mla as CM
    CM.flash_mla_with_kvcache(*_args(p), executor=executor)


def _kernel_limits(p: DecodeProblem):
    from ..cuda import mla as CM
    CM.check_supported(p.q, p.k_cache, p.head_dim_v)


def _kernel_choice(p: DecodeProblem) -> list:
    from ..cuda import attention_explain
    return attention_explain.mla_decode_choice(p)


def triton_cache_limits(k_cache) -> None:
    """The Triton decodes read an FP8 cache's float32 scales through a float32 view of its
    bytes: its data pointer must be 4-byte aligned (a bf16 cache: any)."""
    if RM.is_fp8_cache(k_cache):
        V.check_aligned("k_cache", k_cache, 4, "the FP8 layout's float32 scales are read as float32")


DECODE = registry.op("flash_mla_with_kvcache", lambda *a, **kw: public_decode_problem(*a, **kw))
for _name in ("cuda", "emu"):
    DECODE.add(B.kernel(_name, "mla_decode", _kernel, _kernel_limits, _kernel_choice))
DECODE.add(B.triton(lambda p: _triton().flash_mla_with_kvcache(*_args(p)), lambda p: triton_cache_limits(p.k_cache)))
DECODE.add(B.reference(_reference))


def outputs(q, out=None, softmax_lse=None):
    """(q, out, softmax_lse) with out bf16 [b, s_q, h_q, 512] and softmax_lse float32
    [b, h_q, s_q] allocated where not given (q checked first: its shape sizes them)."""
    q = V.as_tensor("q", q)
    b, s_q, h_q = check_q(q)
    if out is None:
        out = q.new_empty((b, s_q, h_q, RM.HEAD_DIM_V))
    if softmax_lse is None:
        softmax_lse = q.new_empty((b, h_q, s_q), dtype=torch.float32)
    return q, V.as_tensor("out", out), V.as_tensor("softmax_lse", softmax_lse)


def public_decode_problem(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                          num_splits, softmax_scale=None, causal=False, *, out=None, softmax_lse=None):
    """The problem of a call in the public (FlashMLA) argument order; out / softmax_lse
    are allocated when not given."""
    q, out, softmax_lse = outputs(q, out, softmax_lse)
    return decode_problem(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                          out, softmax_lse, head_dim_v, softmax_scale, causal)


def flash_mla_with_kvcache_body(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
                                cache_seqlens: torch.Tensor, tile_scheduler_metadata: torch.Tensor,
                                num_splits: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                head_dim_v: int, softmax_scale: float, causal: bool, backend: str) -> None:
    DECODE(decode_problem(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                          out, lse, head_dim_v, softmax_scale, causal), backend)


flash_mla_with_kvcache_op = torch.library.custom_op("pykernels::flash_mla_with_kvcache",
                                                    mutates_args=("out", "lse"))(flash_mla_with_kvcache_body)


@flash_mla_with_kvcache_op.register_fake
def _(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits, out, lse,
      head_dim_v, softmax_scale, causal, backend):
    decode_problem(q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, num_splits,
                   out, lse, head_dim_v, softmax_scale, causal)
