"""DeepSeek Sparse Attention ops: problems, backends, custom ops (docs/dsa.md).

fp8_mqa_logits: q e4m3 [M, H, D]; k e4m3 [N, D]; k_scales f32 [N]; weights f32 [M, H];
  cu_seqlen_ks / cu_seqlen_ke int32 [M] -> out f32 [M, N].
fp8_paged_mqa_logits: q e4m3 [b, next_n, H, D]; kv_cache uint8 [num_blocks, block_kv, 1, D + 4];
  weights f32 [b * next_n, H]; context_lens int32 [b] or [b, next_n]; block_table int32
  [b, max_blocks]; schedule_metadata int32 [num_sms + 1, 2] -> out f32 [b * next_n, max_context_len].
get_paged_mqa_logits_metadata: context_lens, block_kv, num_sms -> int32 [num_sms + 1, 2].
topk_indices: logits f32 [M, N], cu_seqlen_ks / ke -> out int32 [M, topk] key positions.
paged_topk_indices: logits f32 [b * next_n, L], context_lens, block_table -> out int32
  [b, next_n, topk] cache indices (block * 64 + offset).
flash_mla_sparse_decode: q bf16 [b, s_q, h_q, 576]; FP8 k_cache [num_blocks, 64, 1, 656];
  indices int32 [b, s_q, topk]; attn_sink f32 [h_q]?; topk_length int32 [b]? -> out bf16
  [b, s_q, h_q, 512], lse f32 [b, h_q, s_q].
flash_mla_sparse_fwd: q bf16 [s_q, h_q, d_qk]; kv bf16 [s_kv, 1, d_qk]; indices int32
  [s_q, 1, topk] -> out bf16 [s_q, h_q, d_v], max_logits f32 [s_q, h_q], lse f32 [s_q, h_q].

Every op has the reference backend and the Triton one: get_paged_mqa_logits_metadata
(pykernels/triton/dsa_schedule.py), fp8_mqa_logits and fp8_paged_mqa_logits
(triton/dsa_logits.py), both top-k ops (triton/dsa_topk.py, topk <= 8192),
flash_mla_sparse_decode (triton/dsa_decode.py) and flash_mla_sparse_fwd
(triton/dsa_prefill.py). The hand-written kernels ("cuda", and "emu" on the emulator:
`OP.add(B.kernel(...))`) sit beside them for every op (flash_mla_sparse_fwd: the sparse
decode's kernel over kv's bf16 rows, d_qk 576 and h_q a multiple of 64; Triton takes the rest).
Outputs are written in place (the public functions allocate them).
"""
import dataclasses
import math
import numbers
from typing import Optional

import torch

from .. import registry
from ..mla_schedule import check_schedule
from ..reference import dsa as RD
from ..reference import mla as RM
from ..runtime import device_errors as DE
from ..runtime import validate as V
from . import backends as B
from .mla import MAX_SM_PARTS, check_q, triton_cache_limits

FP8 = torch.float8_e4m3fn
INDEXER_HEAD_DIMS = (32, 64, 128)       # DeepGEMM's indexer head dims
MAX_INDEXER_HEADS = 128
MAX_INT32 = 2**31 - 1
SPARSE_PREFILL_DIMS = (576, 512)        # d_qk of V3.2 (576) and of FlashMLA's later MODEL1 (512)


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_bool(name, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
    return v


def _check_scale(name, v, default=None) -> float:
    if v is None and default is not None:
        return default
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name}: expected a positive finite float, got {v!r}")
    return float(v)


def _host_values(*tensors) -> bool:
    """Value checks read the data: CPU tensors with data (never fake ones)."""
    return all(t is None or (t.device.type == "cpu" and not V.is_fake(t)) for t in tensors)


def _check_q_fp8(q, rank):
    V.check_dtype("q", q, FP8)
    V.check_rank("q", q, rank)
    h, d = q.shape[-2:]
    if d not in INDEXER_HEAD_DIMS:
        raise ValueError(f"q: expected head dim in {INDEXER_HEAD_DIMS} (last dim), got {d} in shape {list(q.shape)}")
    if not 1 <= h <= MAX_INDEXER_HEADS:
        raise ValueError(f"q: expected 1 to {MAX_INDEXER_HEADS} heads (dim {rank - 2}), got {h} in shape "
                         f"{list(q.shape)}")
    V.check_contiguous("q", q)
    return h, d


def _check_int32_vector(name, t, n):
    V.check_dtype(name, t, torch.int32)
    V.check_shape(name, t, (n,))
    V.check_contiguous(name, t)


def _check_optional(name, t, dtype, shape):
    if t is None:
        return None
    t = V.as_tensor(name, t)
    V.check_dtype(name, t, dtype)
    V.check_shape(name, t, shape)
    V.check_contiguous(name, t)
    return t


# --- fp8_mqa_logits (prefill) --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MqaLogitsProblem:
    q: torch.Tensor
    k: torch.Tensor
    k_scales: torch.Tensor
    weights: torch.Tensor
    cu_seqlen_ks: torch.Tensor
    cu_seqlen_ke: torch.Tensor
    out: torch.Tensor
    clean_logits: bool
    device: torch.device

    def describe(self) -> str:
        m, h, d = self.q.shape
        return f"M={m} N={self.k.shape[0]} H={h} D={d} on {self.device}"


def _check_windows(ks, ke, n):
    """0 <= ks[i] <= ke[i] <= n, else ValueError for the first bad row, in the words of the
    kernels' device error record (device_errors)."""
    lo, hi = ks.long(), ke.long()
    bad_lo = (lo < 0) | (lo > n)
    bad = bad_lo | (hi < lo) | (hi > n)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        if bool(bad_lo[i]):
            raise ValueError(DE.describe("WindowStartOutOfRange", int(lo[i]), n, i))
        raise ValueError(DE.describe("WindowEndOutOfRange", int(hi[i]), n, i))


def _check_context_lens_values(context_lens, hi):
    """context_lens in [0, hi], else ValueError for the first bad one (flat index), in the
    words of the kernels' device error record."""
    flat = context_lens.reshape(-1).long()
    bad = (flat < 0) | (flat > hi)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(DE.describe("ContextLensOutOfRange", int(flat[i]), hi, i))


def mqa_logits_problem(q, k, k_scales, weights, cu_seqlen_ks, cu_seqlen_ke, out, clean_logits) -> MqaLogitsProblem:
    q, k, k_scales, weights = (V.as_tensor(n, t) for n, t in
                               (("q", q), ("k", k), ("k_scales", k_scales), ("weights", weights)))
    ks, ke, out = (V.as_tensor(n, t) for n, t in
                   (("cu_seqlen_ks", cu_seqlen_ks), ("cu_seqlen_ke", cu_seqlen_ke), ("out", out)))
    h, d = _check_q_fp8(q, 3)
    m = q.shape[0]
    V.check_dtype("k", k, FP8)
    V.check_shape("k", k, (None, d))
    V.check_contiguous("k", k)
    n = k.shape[0]
    V.check_dtype("k_scales", k_scales, torch.float32)
    V.check_shape("k_scales", k_scales, (n,))
    V.check_contiguous("k_scales", k_scales)
    V.check_dtype("weights", weights, torch.float32)
    V.check_shape("weights", weights, (m, h))
    V.check_inner_contiguous("weights", weights)
    _check_int32_vector("cu_seqlen_ks", ks, m)
    _check_int32_vector("cu_seqlen_ke", ke, m)
    V.check_dtype("out", out, torch.float32)
    V.check_shape("out", out, (m, n))
    V.check_inner_contiguous("out", out)
    _check_bool("clean_logits", clean_logits)
    dev = V.check_same_device(q=q, k=k, k_scales=k_scales, weights=weights, cu_seqlen_ks=ks, cu_seqlen_ke=ke,
                              out=out)
    if not V.is_fake(out):
        V.check_no_overlap("out", out, q=q, k=k, k_scales=k_scales, weights=weights, cu_seqlen_ks=ks,
                           cu_seqlen_ke=ke)
    if _host_values(ks, ke):
        _check_windows(ks, ke, n)
    return MqaLogitsProblem(q, k, k_scales, weights, ks, ke, out, clean_logits, dev)


def _check_gpu_windows(p: MqaLogitsProblem):
    """The windows of GPU tensors, read on the host (CPU ones were checked by the builder)."""
    if p.device.type != "cpu":
        _check_windows(p.cu_seqlen_ks.cpu(), p.cu_seqlen_ke.cpu(), p.k.shape[0])


def _mqa_logits_reference(p: MqaLogitsProblem):
    _check_gpu_windows(p)
    p.out.copy_(RD.fp8_mqa_logits(p.q, p.k, p.k_scales, p.weights, p.cu_seqlen_ks, p.cu_seqlen_ke))


def _mqa_logits_triton(p: MqaLogitsProblem):
    from ..triton import dsa_logits as TL
    _check_gpu_windows(p)
    TL.fp8_mqa_logits(p.q, p.k, p.k_scales, p.weights, p.cu_seqlen_ks, p.cu_seqlen_ke, p.out)


def _mqa_logits_kernel(p: MqaLogitsProblem, executor: str):
    from ..cuda import dsa as CD      # the kernel checks the windows (device error record): no host read
    CD.fp8_mqa_logits(p.q, p.k, p.k_scales, p.weights, p.cu_seqlen_ks, p.cu_seqlen_ke, p.out, executor)


def _mqa_logits_kernel_limits(p: MqaLogitsProblem):
    from ..cuda import dsa as CD
    CD.check_logits_supported(p.q, p.k, p.weights, "k", p.k_scales)


MQA_LOGITS = registry.op("fp8_mqa_logits", lambda *a, **kw: public_mqa_logits_problem(*a, **kw))
for _name in ("cuda", "emu"):
    MQA_LOGITS.add(B.kernel(_name, "dsa_indexer_logits", _mqa_logits_kernel, _mqa_logits_kernel_limits))
MQA_LOGITS.add(B.triton(_mqa_logits_triton))
MQA_LOGITS.add(B.reference(_mqa_logits_reference))


def public_mqa_logits_problem(q, kv, weights, cu_seqlen_ks, cu_seqlen_ke, clean_logits=True, *, out=None):
    """The problem of a call in DeepGEMM's argument order (kv = (k, k_scales))."""
    k, k_scales = unpack_kv(kv)
    if out is None:
        out = new_logits(q, k)
    return mqa_logits_problem(q, k, k_scales, weights, cu_seqlen_ks, cu_seqlen_ke, out, clean_logits)


def unpack_kv(kv):
    """DeepGEMM's kv pair (k e4m3 [N, D], k_scales float32 [N]) -> (k, k_scales)."""
    if not isinstance(kv, (tuple, list)) or len(kv) != 2:
        raise TypeError(f"kv: expected a (k, k_scales) pair, got {type(kv).__name__}")
    return V.as_tensor("k", kv[0]), V.as_tensor("k_scales", kv[1])


def new_logits(q, k):
    """float32 [M, N] for fp8_mqa_logits (q [M, H, D], k [N, D]); q / k checked just enough
    to size it."""
    q, k = V.as_tensor("q", q), V.as_tensor("k", k)
    V.check_rank("q", q, 3)
    V.check_rank("k", k, 2)
    return torch.empty((q.shape[0], k.shape[0]), dtype=torch.float32, device=q.device)


def fp8_mqa_logits_body(q: torch.Tensor, k: torch.Tensor, k_scales: torch.Tensor, weights: torch.Tensor,
                        cu_seqlen_ks: torch.Tensor, cu_seqlen_ke: torch.Tensor, out: torch.Tensor,
                        clean_logits: bool, backend: str) -> None:
    MQA_LOGITS(mqa_logits_problem(q, k, k_scales, weights, cu_seqlen_ks, cu_seqlen_ke, out, clean_logits), backend)


fp8_mqa_logits_op = torch.library.custom_op("pykernels::fp8_mqa_logits", mutates_args=("out",))(fp8_mqa_logits_body)


@fp8_mqa_logits_op.register_fake
def _(q, k, k_scales, weights, cu_seqlen_ks, cu_seqlen_ke, out, clean_logits, backend):
    mqa_logits_problem(q, k, k_scales, weights, cu_seqlen_ks, cu_seqlen_ke, out, clean_logits)


# --- paged logits: schedule ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PagedMetadataProblem:
    context_lens: torch.Tensor
    block_kv: int
    num_sms: int

    @property
    def device(self):
        return self.context_lens.device

    def describe(self) -> str:
        return f"b={self.context_lens.shape[0]} block_kv={self.block_kv} num_sms={self.num_sms} on {self.device}"


def _check_context_lens(context_lens, b=None, next_n=None):
    V.check_dtype("context_lens", context_lens, torch.int32)
    if context_lens.dim() not in (1, 2):
        raise ValueError(f"context_lens: expected a 1-D [b] or 2-D [b, next_n] tensor, got "
                         f"{context_lens.dim()}-D with shape {list(context_lens.shape)}")
    if b is not None:
        want = (b,) if context_lens.dim() == 1 else (b, next_n)
        V.check_shape("context_lens", context_lens, want)
    V.check_contiguous("context_lens", context_lens)


def paged_metadata_problem(context_lens, block_kv, num_sms) -> PagedMetadataProblem:
    lens = V.as_tensor("context_lens", context_lens)
    _check_context_lens(lens)
    blk = V.check_int("block_kv", block_kv, lo=1, hi=1 << 16)
    sms = V.check_int("num_sms", num_sms, lo=1, hi=MAX_SM_PARTS)
    if _host_values(lens):
        _check_context_lens_values(lens, MAX_INT32)
    return PagedMetadataProblem(lens, blk, sms)


def _paged_metadata_kernel(p: PagedMetadataProblem, executor: str):
    from ..cuda import dsa as CD
    return CD.paged_logits_schedule(p.context_lens, p.block_kv, p.num_sms, executor)


def _paged_metadata_triton(p: PagedMetadataProblem):
    from ..triton import dsa_schedule as TS
    return TS.paged_logits_schedule(p.context_lens, p.block_kv, p.num_sms)


def _paged_metadata_kernel_limits(p: PagedMetadataProblem):
    from ..cuda import dsa as CD
    CD.check_logits_schedule_supported(p.context_lens)


PAGED_METADATA = registry.op("get_paged_mqa_logits_metadata", paged_metadata_problem)
for _name in ("cuda", "emu"):
    PAGED_METADATA.add(B.kernel(_name, "dsa_logits_schedule", _paged_metadata_kernel, _paged_metadata_kernel_limits))
PAGED_METADATA.add(B.triton(_paged_metadata_triton))
PAGED_METADATA.add(B.reference(lambda p: RD.get_paged_mqa_logits_metadata(p.context_lens, p.block_kv, p.num_sms)))


def get_paged_mqa_logits_metadata_body(context_lens: torch.Tensor, block_kv: int, num_sms: int,
                                       backend: str) -> torch.Tensor:
    return PAGED_METADATA(paged_metadata_problem(context_lens, block_kv, num_sms), backend)


get_paged_mqa_logits_metadata_op = torch.library.custom_op(
    "pykernels::get_paged_mqa_logits_metadata", mutates_args=())(get_paged_mqa_logits_metadata_body)


@get_paged_mqa_logits_metadata_op.register_fake
def _(context_lens, block_kv, num_sms, backend):
    p = paged_metadata_problem(context_lens, block_kv, num_sms)
    return p.context_lens.new_empty((p.num_sms + 1, RD.METADATA_WIDTH))


# --- fp8_paged_mqa_logits (decode) --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PagedMqaLogitsProblem:
    q: torch.Tensor
    kv_cache: torch.Tensor
    weights: torch.Tensor
    context_lens: torch.Tensor
    block_table: torch.Tensor
    schedule_metadata: torch.Tensor
    out: torch.Tensor
    max_context_len: int
    clean_logits: bool
    device: torch.device

    @property
    def block_kv(self) -> int:
        return self.kv_cache.shape[1]

    def describe(self) -> str:
        b, next_n, h, d = self.q.shape
        return (f"b={b} next_n={next_n} H={h} D={d} block_kv={self.block_kv} "
                f"max_context_len={self.max_context_len} on {self.device}")


def _check_block_table_pages(block_table, ends_per_seq, page, num_blocks):
    """block_table entries of the pages in use (ceil(end / page) per sequence) in [0, num_blocks)."""
    used = torch.arange(block_table.shape[1])[None, :] < ((ends_per_seq + page - 1) // page)[:, None]
    bad = used & ((block_table.long() < 0) | (block_table.long() >= num_blocks))
    if bool(bad.any()):
        i, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(DE.describe("BlockTableOutOfRange", int(block_table[i, j]), num_blocks, i))


def _check_paged_values(p: PagedMqaLogitsProblem) -> None:
    b, next_n = p.q.shape[:2]
    coverage = p.block_table.shape[1] * p.block_kv
    _check_context_lens_values(p.context_lens, min(coverage, p.max_context_len))
    ends = RD.paged_row_windows(p.context_lens, next_n).reshape(b, next_n).amax(dim=1) if b else torch.zeros(0)
    _check_block_table_pages(p.block_table, ends, p.block_kv, p.kv_cache.shape[0])
    parts = p.schedule_metadata.shape[0] - 1
    want = RD.get_paged_mqa_logits_metadata(p.context_lens, p.block_kv, parts)
    if not torch.equal(want, p.schedule_metadata):
        r = int((want != p.schedule_metadata).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"schedule_metadata: expected the schedule of these context_lens "
                         f"(get_paged_mqa_logits_metadata(context_lens, {p.block_kv}, {parts})), got "
                         f"{p.schedule_metadata[r].tolist()} at row {r} instead of {want[r].tolist()}; call it "
                         f"again after the context lengths change")


def paged_mqa_logits_problem(q, kv_cache, weights, context_lens, block_table, schedule_metadata, out,
                             max_context_len, clean_logits) -> PagedMqaLogitsProblem:
    q, kv_cache, weights = (V.as_tensor(n, t) for n, t in (("q", q), ("kv_cache", kv_cache), ("weights", weights)))
    lens, table, meta, out = (V.as_tensor(n, t) for n, t in
                              (("context_lens", context_lens), ("block_table", block_table),
                               ("schedule_metadata", schedule_metadata), ("out", out)))
    h, d = _check_q_fp8(q, 4)
    b, next_n = q.shape[:2]
    if next_n < 1:
        raise ValueError(f"q: expected next_n >= 1 (dim 1), got shape {list(q.shape)}")
    V.check_dtype("kv_cache", kv_cache, torch.uint8)
    V.check_rank("kv_cache", kv_cache, 4)
    if kv_cache.shape[2] != 1 or kv_cache.shape[3] != d + RD.INDEXER_SCALE_BYTES or kv_cache.shape[1] < 1:
        raise ValueError(f"kv_cache: expected shape [num_blocks, block_kv >= 1, 1, {d + RD.INDEXER_SCALE_BYTES}] "
                         f"(head dim {d} + a float32 scale), got {list(kv_cache.shape)}")
    V.check_contiguous("kv_cache", kv_cache)
    V.check_dtype("weights", weights, torch.float32)
    V.check_shape("weights", weights, (b * next_n, h))
    V.check_inner_contiguous("weights", weights)
    _check_context_lens(lens, b, next_n)
    V.check_dtype("block_table", table, torch.int32)
    V.check_shape("block_table", table, (b, None))
    V.check_contiguous("block_table", table)
    V.check_dtype("schedule_metadata", meta, torch.int32)
    V.check_shape("schedule_metadata", meta, (None, RD.METADATA_WIDTH))
    if meta.shape[0] < 2:
        raise ValueError(f"schedule_metadata: expected shape [num_sms + 1 >= 2, 2], got {list(meta.shape)}")
    V.check_contiguous("schedule_metadata", meta)
    max_len = V.check_int("max_context_len", max_context_len, lo=0, hi=MAX_INT32)
    V.check_dtype("out", out, torch.float32)
    V.check_shape("out", out, (b * next_n, max_len))
    V.check_inner_contiguous("out", out)
    _check_bool("clean_logits", clean_logits)
    dev = V.check_same_device(q=q, kv_cache=kv_cache, weights=weights, context_lens=lens, block_table=table,
                              schedule_metadata=meta, out=out)
    p = PagedMqaLogitsProblem(q, kv_cache, weights, lens, table, meta, out, max_len, clean_logits, dev)
    if not V.is_fake(out):
        V.check_no_overlap("out", out, q=q, kv_cache=kv_cache, weights=weights, context_lens=lens,
                           block_table=table, schedule_metadata=meta)
        if _host_values(lens, table, meta):
            _check_paged_values(p)
    return p


def _check_gpu_paged_values(p: PagedMqaLogitsProblem):
    """_check_paged_values for GPU tensors, read on the host (CPU ones: checked by the builder)."""
    if p.device.type != "cpu":
        _check_paged_values(dataclasses.replace(p, context_lens=p.context_lens.cpu(), block_table=p.block_table.cpu(),
                                                schedule_metadata=p.schedule_metadata.cpu()))


def _paged_reference(p: PagedMqaLogitsProblem):
    _check_gpu_paged_values(p)
    p.out.copy_(RD.fp8_paged_mqa_logits(p.q, p.kv_cache, p.weights, p.context_lens, p.block_table,
                                        p.max_context_len))


def _paged_triton(p: PagedMqaLogitsProblem):
    from ..triton import dsa_logits as TL
    _check_gpu_paged_values(p)
    TL.fp8_paged_mqa_logits(p.q, p.kv_cache, p.weights, p.context_lens, p.block_table, p.out, p.max_context_len)


def _paged_kernel(p: PagedMqaLogitsProblem, executor: str):
    # the kernel checks context_lens and the pages in use (device error record): no host read;
    # it does not read schedule_metadata, whose values are checked on CPU tensors only
    from ..cuda import dsa as CD
    CD.fp8_paged_mqa_logits(p.q, p.kv_cache, p.weights, p.context_lens, p.block_table, p.out, p.max_context_len,
                            executor)


def _paged_kernel_limits(p: PagedMqaLogitsProblem):
    from ..cuda import dsa as CD
    CD.check_logits_supported(p.q, p.kv_cache, p.weights, "kv_cache")


PAGED_LOGITS = registry.op("fp8_paged_mqa_logits", lambda *a, **kw: public_paged_mqa_logits_problem(*a, **kw))
for _name in ("cuda", "emu"):
    PAGED_LOGITS.add(B.kernel(_name, "dsa_indexer_logits", _paged_kernel, _paged_kernel_limits))
PAGED_LOGITS.add(B.triton(_paged_triton))
PAGED_LOGITS.add(B.reference(_paged_reference))


def public_paged_mqa_logits_problem(q, kv_cache, weights, context_lens, block_table, schedule_metadata,
                                    max_context_len, clean_logits=True, *, out=None):
    if out is None:
        out = new_paged_logits(q, max_context_len)
    return paged_mqa_logits_problem(q, kv_cache, weights, context_lens, block_table, schedule_metadata, out,
                                    max_context_len, clean_logits)


def new_paged_logits(q, max_context_len):
    q = V.as_tensor("q", q)
    V.check_rank("q", q, 4)
    width = V.check_int("max_context_len", max_context_len, lo=0, hi=MAX_INT32)
    return torch.empty((q.shape[0] * q.shape[1], width), dtype=torch.float32, device=q.device)


def fp8_paged_mqa_logits_body(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                              context_lens: torch.Tensor, block_table: torch.Tensor,
                              schedule_metadata: torch.Tensor, out: torch.Tensor, max_context_len: int,
                              clean_logits: bool, backend: str) -> None:
    PAGED_LOGITS(paged_mqa_logits_problem(q, kv_cache, weights, context_lens, block_table, schedule_metadata, out,
                                          max_context_len, clean_logits), backend)


fp8_paged_mqa_logits_op = torch.library.custom_op("pykernels::fp8_paged_mqa_logits",
                                                  mutates_args=("out",))(fp8_paged_mqa_logits_body)


@fp8_paged_mqa_logits_op.register_fake
def _(q, kv_cache, weights, context_lens, block_table, schedule_metadata, out, max_context_len, clean_logits,
      backend):
    paged_mqa_logits_problem(q, kv_cache, weights, context_lens, block_table, schedule_metadata, out,
                             max_context_len, clean_logits)


# --- top-k -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TopkProblem:
    logits: torch.Tensor
    topk: int
    out: torch.Tensor
    cu_seqlen_ks: Optional[torch.Tensor]      # prefill form
    cu_seqlen_ke: Optional[torch.Tensor]
    context_lens: Optional[torch.Tensor]      # paged form
    block_table: Optional[torch.Tensor]
    device: torch.device

    @property
    def paged(self) -> bool:
        return self.block_table is not None

    def describe(self) -> str:
        form = "paged" if self.paged else "prefill"
        return f"{form} rows={self.logits.shape[0]} N={self.logits.shape[1]} topk={self.topk} on {self.device}"


def _check_logits(logits):
    V.check_dtype("logits", logits, torch.float32)
    V.check_rank("logits", logits, 2)
    V.check_inner_contiguous("logits", logits)


def topk_problem(logits, cu_seqlen_ks, cu_seqlen_ke, topk, out) -> TopkProblem:
    logits, ks, ke, out = (V.as_tensor(n, t) for n, t in (("logits", logits), ("cu_seqlen_ks", cu_seqlen_ks),
                                                          ("cu_seqlen_ke", cu_seqlen_ke), ("out", out)))
    _check_logits(logits)
    m, n = logits.shape
    _check_int32_vector("cu_seqlen_ks", ks, m)
    _check_int32_vector("cu_seqlen_ke", ke, m)
    k = V.check_int("topk", topk, lo=1, hi=MAX_INT32)
    V.check_dtype("out", out, torch.int32)
    V.check_shape("out", out, (m, k))
    V.check_inner_contiguous("out", out)
    dev = V.check_same_device(logits=logits, cu_seqlen_ks=ks, cu_seqlen_ke=ke, out=out)
    if not V.is_fake(out):
        V.check_no_overlap("out", out, logits=logits, cu_seqlen_ks=ks, cu_seqlen_ke=ke)
    if _host_values(ks, ke):
        _check_windows(ks, ke, n)
    return TopkProblem(logits, k, out, ks, ke, None, None, dev)


def _check_paged_topk_values(p: TopkProblem) -> None:
    b = p.block_table.shape[0]
    next_n = p.logits.shape[0] // b if b else 0
    coverage = p.block_table.shape[1] * RM.PAGE_BLOCK_SIZE
    _check_context_lens_values(p.context_lens, min(coverage, p.logits.shape[1]))
    ends = RD.paged_row_windows(p.context_lens, next_n).reshape(b, next_n).amax(dim=1) if b else torch.zeros(0)
    # page ids: page * 64 + offset must fit int32
    _check_block_table_pages(p.block_table, ends, RM.PAGE_BLOCK_SIZE, MAX_INT32 // RM.PAGE_BLOCK_SIZE + 1)


def paged_topk_problem(logits, context_lens, block_table, topk, out) -> TopkProblem:
    logits, lens, table, out = (V.as_tensor(n, t) for n, t in (("logits", logits), ("context_lens", context_lens),
                                                               ("block_table", block_table), ("out", out)))
    _check_logits(logits)
    V.check_dtype("block_table", table, torch.int32)
    V.check_rank("block_table", table, 2)
    V.check_contiguous("block_table", table)
    b = table.shape[0]
    if b == 0 or logits.shape[0] % b:
        raise ValueError(f"logits: expected b * next_n rows for block_table's b = {b} sequences, got "
                         f"{logits.shape[0]} rows")
    next_n = logits.shape[0] // b
    _check_context_lens(lens, b, next_n)
    k = V.check_int("topk", topk, lo=1, hi=MAX_INT32)
    V.check_dtype("out", out, torch.int32)
    V.check_shape("out", out, (b, next_n, k))
    V.check_inner_contiguous("out", out)
    dev = V.check_same_device(logits=logits, context_lens=lens, block_table=table, out=out)
    p = TopkProblem(logits, k, out, None, None, lens, table, dev)
    if not V.is_fake(out):
        V.check_no_overlap("out", out, logits=logits, context_lens=lens, block_table=table)
        if _host_values(lens, table):
            _check_paged_topk_values(p)
    return p


def _check_gpu_topk_values(p: TopkProblem):
    """The windows / context_lens and block table of GPU tensors, read on the host (CPU ones:
    checked by the builder)."""
    if p.device.type == "cpu":
        return
    if p.paged:
        _check_paged_topk_values(dataclasses.replace(p, context_lens=p.context_lens.cpu(),
                                                     block_table=p.block_table.cpu()))
    else:
        _check_windows(p.cu_seqlen_ks.cpu(), p.cu_seqlen_ke.cpu(), p.logits.shape[1])


def _topk_reference(p: TopkProblem):
    _check_gpu_topk_values(p)
    if p.paged:
        p.out.copy_(RD.paged_topk_indices(p.logits, p.context_lens, p.block_table, p.topk))
    else:
        p.out.copy_(RD.topk_indices(p.logits, p.cu_seqlen_ks, p.cu_seqlen_ke, p.topk))


def _topk_triton(p: TopkProblem):
    from ..triton import dsa_topk as TK
    _check_gpu_topk_values(p)
    if p.paged:
        TK.paged_topk_indices(p.logits, p.context_lens, p.block_table, p.topk, p.out)
    else:
        TK.topk_indices(p.logits, p.cu_seqlen_ks, p.cu_seqlen_ke, p.topk, p.out)


def _topk_triton_limits(p: TopkProblem):
    from ..triton import dsa_topk as TK
    TK.check_limits(p.topk)


def new_topk_out(logits, topk):
    logits = V.as_tensor("logits", logits)
    V.check_rank("logits", logits, 2)
    k = V.check_int("topk", topk, lo=1, hi=MAX_INT32)
    return torch.empty((logits.shape[0], k), dtype=torch.int32, device=logits.device)


def new_paged_topk_out(logits, block_table, topk):
    logits, table = V.as_tensor("logits", logits), V.as_tensor("block_table", block_table)
    V.check_rank("logits", logits, 2)
    V.check_rank("block_table", table, 2)
    b = table.shape[0]
    k = V.check_int("topk", topk, lo=1, hi=MAX_INT32)
    return torch.empty((b, logits.shape[0] // b if b else 0, k), dtype=torch.int32, device=logits.device)


def public_topk_problem(logits, topk, cu_seqlen_ks, cu_seqlen_ke, *, out=None):
    out = new_topk_out(logits, topk) if out is None else out
    return topk_problem(logits, cu_seqlen_ks, cu_seqlen_ke, topk, out)


def public_paged_topk_problem(logits, topk, context_lens, block_table, *, out=None):
    out = new_paged_topk_out(logits, block_table, topk) if out is None else out
    return paged_topk_problem(logits, context_lens, block_table, topk, out)


def _topk_kernel(p: TopkProblem, executor: str):
    from ..cuda import dsa as CD      # the kernel checks windows / lengths / pages (device error record)
    if p.paged:
        CD.paged_topk_indices(p.logits, p.context_lens, p.block_table, p.topk, p.out, executor)
    else:
        CD.topk_indices(p.logits, p.cu_seqlen_ks, p.cu_seqlen_ke, p.topk, p.out, executor)


def _topk_kernel_limits(p: TopkProblem):
    from ..cuda import dsa as CD
    CD.check_topk_supported(p.topk)


TOPK = registry.op("topk_indices", public_topk_problem)
PAGED_TOPK = registry.op("paged_topk_indices", public_paged_topk_problem)
for _op in (TOPK, PAGED_TOPK):
    for _name in ("cuda", "emu"):
        _op.add(B.kernel(_name, "dsa_topk", _topk_kernel, _topk_kernel_limits))
    _op.add(B.triton(_topk_triton, _topk_triton_limits))
    _op.add(B.reference(_topk_reference))


def topk_indices_body(logits: torch.Tensor, cu_seqlen_ks: torch.Tensor, cu_seqlen_ke: torch.Tensor, topk: int,
                      out: torch.Tensor, backend: str) -> None:
    TOPK(topk_problem(logits, cu_seqlen_ks, cu_seqlen_ke, topk, out), backend)


def paged_topk_indices_body(logits: torch.Tensor, context_lens: torch.Tensor, block_table: torch.Tensor,
                            topk: int, out: torch.Tensor, backend: str) -> None:
    PAGED_TOPK(paged_topk_problem(logits, context_lens, block_table, topk, out), backend)


topk_indices_op = torch.library.custom_op("pykernels::topk_indices", mutates_args=("out",))(topk_indices_body)
paged_topk_indices_op = torch.library.custom_op("pykernels::paged_topk_indices",
                                                mutates_args=("out",))(paged_topk_indices_body)


@topk_indices_op.register_fake
def _(logits, cu_seqlen_ks, cu_seqlen_ke, topk, out, backend):
    topk_problem(logits, cu_seqlen_ks, cu_seqlen_ke, topk, out)


@paged_topk_indices_op.register_fake
def _(logits, context_lens, block_table, topk, out, backend):
    paged_topk_problem(logits, context_lens, block_table, topk, out)


# --- flash_mla_sparse_decode ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SparseDecodeProblem:
    q: torch.Tensor
    k_cache: torch.Tensor
    indices: torch.Tensor
    attn_sink: Optional[torch.Tensor]
    topk_length: Optional[torch.Tensor]
    tile_scheduler_metadata: Optional[torch.Tensor]
    num_splits: Optional[torch.Tensor]
    out: torch.Tensor
    softmax_lse: torch.Tensor
    head_dim_v: int
    softmax_scale: float
    device: torch.device

    def describe(self) -> str:
        b, s_q, h_q, _ = self.q.shape
        return (f"b={b} s_q={s_q} h_q={h_q} topk={self.indices.shape[2]} over an FP8 cache of "
                f"{self.k_cache.shape[0]} pages on {self.device}")


def check_fp8_cache(k_cache):
    """k_cache: the 656-byte FP8 layout, uint8 / float8_e4m3fn [num_blocks, 64, 1, 656], contiguous."""
    V.check_dtype("k_cache", k_cache, torch.uint8, FP8)
    V.check_shape("k_cache", k_cache, (None, RM.PAGE_BLOCK_SIZE, 1, RM.FP8_BYTES_PER_TOKEN))
    V.check_contiguous("k_cache", k_cache)


def _check_topk_length_values(topk_length, topk: int) -> None:
    """topk_length in [0, topk], else ValueError for the first bad one, in the words of the
    kernels' device error record (code TopkLengthOutOfRange)."""
    lens = topk_length.long()
    bad = (lens < 0) | (lens > topk)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(DE.describe("TopkLengthOutOfRange", int(lens[i]), topk, i))


def _check_sparse_decode_values(p: SparseDecodeProblem) -> None:
    """topk_length, the used slots' indices (the first bad one by flat index, in the words of
    the device error record: code SparseIndexOutOfRange) and the schedule, read on the host."""
    topk = p.indices.shape[2]
    if p.topk_length is not None:
        _check_topk_length_values(p.topk_length, topk)
    rows = p.k_cache.shape[0] * RM.PAGE_BLOCK_SIZE
    idx = p.indices.long()
    used = idx != -1
    if p.topk_length is not None:
        used &= torch.arange(topk)[None, None, :] < p.topk_length.long()[:, None, None]
    bad = (used & ((idx < 0) | (idx >= rows))).reshape(-1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(DE.describe("SparseIndexOutOfRange", int(idx.reshape(-1)[i]), rows, i))
    if p.tile_scheduler_metadata is not None:
        b = p.q.shape[0]
        check_schedule(p.tile_scheduler_metadata, p.num_splits, torch.full((b,), topk, dtype=torch.int32))


def check_softmax_scale(softmax_scale) -> float:
    """None (576 ** -0.5) or a positive finite float."""
    return _check_scale("softmax_scale", softmax_scale, RM.default_softmax_scale())


def sparse_decode_problem(q, k_cache, indices, attn_sink, topk_length, tile_scheduler_metadata, num_splits,
                          out, softmax_lse, head_dim_v, softmax_scale) -> SparseDecodeProblem:
    """Validate one sparse decode call. tile_scheduler_metadata / num_splits: None, or the
    schedule of get_mla_metadata's sparse form (checked against topk tokens per sequence)."""
    q, k_cache, indices, out, lse = (V.as_tensor(n, t) for n, t in
                                     (("q", q), ("k_cache", k_cache), ("indices", indices), ("out", out),
                                      ("softmax_lse", softmax_lse)))
    b, s_q, h_q = check_q(q)
    check_fp8_cache(k_cache)
    V.check_dtype("indices", indices, torch.int32)
    V.check_shape("indices", indices, (b, s_q, None))
    if indices.shape[2] < 1:
        raise ValueError(f"indices: expected topk >= 1 (dim 2), got shape {list(indices.shape)}")
    V.check_inner_contiguous("indices", indices)
    attn_sink = _check_optional("attn_sink", attn_sink, torch.float32, (h_q,))
    topk_length = _check_optional("topk_length", topk_length, torch.int32, (b,))
    if (tile_scheduler_metadata is None) != (num_splits is None):
        raise ValueError("tile_scheduler_metadata: expected it and num_splits both given or both None, got "
                         f"{type(tile_scheduler_metadata).__name__} and {type(num_splits).__name__}")
    meta = _check_optional("tile_scheduler_metadata", tile_scheduler_metadata, torch.int32, (None, RM.METADATA_SIZE))
    if meta is not None and meta.shape[0] < 1:   # a shape: checked for every device (the kernels check values)
        raise ValueError(f"tile_scheduler_metadata: expected at least one row, got shape {list(meta.shape)}")
    splits = _check_optional("num_splits", num_splits, torch.int32, (b + 1,))
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, numbers.Integral) or head_dim_v != RM.HEAD_DIM_V:
        raise ValueError(f"head_dim_v: expected {RM.HEAD_DIM_V}, got {head_dim_v!r}")
    scale = check_softmax_scale(softmax_scale)
    V.check_dtype("out", out, torch.bfloat16)
    V.check_shape("out", out, (b, s_q, h_q, RM.HEAD_DIM_V))
    V.check_inner_contiguous("out", out)
    V.check_dtype("softmax_lse", lse, torch.float32)
    V.check_shape("softmax_lse", lse, (b, h_q, s_q))
    inputs = dict(q=q, k_cache=k_cache, indices=indices, attn_sink=attn_sink, topk_length=topk_length,
                  tile_scheduler_metadata=meta, num_splits=splits)
    dev = V.check_same_device(**{n: t for n, t in inputs.items() if t is not None}, out=out, softmax_lse=lse)
    p = SparseDecodeProblem(q, k_cache, indices, attn_sink, topk_length, meta, splits, out, lse, int(head_dim_v),
                            scale, dev)
    if not V.is_fake(out):
        V.check_no_overlap("out", out, **inputs)
        V.check_no_overlap("softmax_lse", lse, out=out, **inputs)
        if _host_values(indices, topk_length, meta, splits):
            _check_sparse_decode_values(p)
    return p


def _check_gpu_sparse_decode_values(p: SparseDecodeProblem):
    """_check_sparse_decode_values for GPU tensors, read on the host (CPU ones: checked by the builder)."""
    if p.device.type != "cpu":
        _check_sparse_decode_values(dataclasses.replace(
            p, indices=p.indices.cpu(), topk_length=None if p.topk_length is None else p.topk_length.cpu(),
            tile_scheduler_metadata=None if p.num_splits is None else p.tile_scheduler_metadata.cpu(),
            num_splits=None if p.num_splits is None else p.num_splits.cpu()))


def _sparse_decode_reference(p: SparseDecodeProblem):
    _check_gpu_sparse_decode_values(p)
    # The reference ignores the schedule (ground truth for any schedule).
    o, lse = RD.flash_mla_sparse_decode(p.q, p.k_cache, p.indices, p.softmax_scale, p.attn_sink, p.topk_length,
                                        p.head_dim_v)
    p.out.copy_(o)
    p.softmax_lse.copy_(lse)


def _sparse_decode_triton(p: SparseDecodeProblem):
    from ..triton import dsa_decode as TD
    _check_gpu_sparse_decode_values(p)
    # one program per (query token, head tile) over all its slots: the schedule is not used
    TD.flash_mla_sparse_decode(p.q, p.k_cache, p.indices, p.attn_sink, p.topk_length, p.out, p.softmax_lse,
                               p.softmax_scale)


def _sparse_decode_kernel(p: SparseDecodeProblem, executor: str):
    # the kernels check topk_length, the used slots' indices and the schedule (device error
    # record: codes TopkLengthOutOfRange, SparseIndexOutOfRange, 4-8): no host read
    from ..cuda import dsa as CD
    CD.sparse_decode(p.q, p.k_cache, p.indices, p.attn_sink, p.topk_length, p.tile_scheduler_metadata, p.num_splits,
                     p.out, p.softmax_lse, p.head_dim_v, p.softmax_scale, executor)


def _sparse_decode_kernel_limits(p: SparseDecodeProblem):
    from ..cuda import dsa as CD
    CD.check_sparse_decode_supported(p.q, p.k_cache, p.head_dim_v)


def _sparse_decode_kernel_choice(p: SparseDecodeProblem) -> list:
    from ..cuda import attention_explain
    return attention_explain.sparse_decode_choice(p)


SPARSE_DECODE = registry.op("flash_mla_sparse_decode", lambda *a, **kw: public_sparse_decode_problem(*a, **kw))
for _name in ("cuda", "emu"):
    SPARSE_DECODE.add(B.kernel(_name, "mla_decode", _sparse_decode_kernel, _sparse_decode_kernel_limits,
                               _sparse_decode_kernel_choice))
SPARSE_DECODE.add(B.triton(_sparse_decode_triton, lambda p: triton_cache_limits(p.k_cache)))
SPARSE_DECODE.add(B.reference(_sparse_decode_reference))


def public_sparse_decode_problem(q, k_cache, indices, softmax_scale=None, attn_sink=None, topk_length=None,
                                 tile_scheduler_metadata=None, num_splits=None, head_dim_v=RM.HEAD_DIM_V, *,
                                 out=None, softmax_lse=None):
    from .mla import outputs
    q, out, softmax_lse = outputs(q, out, softmax_lse)
    return sparse_decode_problem(q, k_cache, indices, attn_sink, topk_length, tile_scheduler_metadata, num_splits,
                                 out, softmax_lse, head_dim_v, softmax_scale)


def flash_mla_sparse_decode_body(q: torch.Tensor, k_cache: torch.Tensor, indices: torch.Tensor,
                                 attn_sink: Optional[torch.Tensor], topk_length: Optional[torch.Tensor],
                                 tile_scheduler_metadata: Optional[torch.Tensor], num_splits: Optional[torch.Tensor],
                                 out: torch.Tensor, lse: torch.Tensor, head_dim_v: int, softmax_scale: float,
                                 backend: str) -> None:
    SPARSE_DECODE(sparse_decode_problem(q, k_cache, indices, attn_sink, topk_length, tile_scheduler_metadata,
                                        num_splits, out, lse, head_dim_v, softmax_scale), backend)


flash_mla_sparse_decode_op = torch.library.custom_op("pykernels::flash_mla_sparse_decode",
                                                     mutates_args=("out", "lse"))(flash_mla_sparse_decode_body)


@flash_mla_sparse_decode_op.register_fake
def _(q, k_cache, indices, attn_sink, topk_length, tile_scheduler_metadata, num_splits, out, lse, head_dim_v,
      softmax_scale, backend):
    sparse_decode_problem(q, k_cache, indices, attn_sink, topk_length, tile_scheduler_metadata, num_splits, out,
                          lse, head_dim_v, softmax_scale)


# --- flash_mla_sparse_fwd (prefill) -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SparsePrefillProblem:
    q: torch.Tensor
    kv: torch.Tensor
    indices: torch.Tensor
    attn_sink: Optional[torch.Tensor]
    topk_length: Optional[torch.Tensor]
    out: torch.Tensor
    max_logits: torch.Tensor
    lse: torch.Tensor
    sm_scale: float
    d_v: int
    device: torch.device

    def describe(self) -> str:
        s_q, h_q, d_qk = self.q.shape
        return (f"s_q={s_q} h_q={h_q} d_qk={d_qk} s_kv={self.kv.shape[0]} topk={self.indices.shape[2]} "
                f"on {self.device}")


def sparse_prefill_problem(q, kv, indices, attn_sink, topk_length, out, max_logits, lse, sm_scale,
                           d_v) -> SparsePrefillProblem:
    q, kv, indices, out, max_logits, lse = (V.as_tensor(n, t) for n, t in
                                            (("q", q), ("kv", kv), ("indices", indices), ("out", out),
                                             ("max_logits", max_logits), ("lse", lse)))
    V.check_dtype("q", q, torch.bfloat16)
    V.check_rank("q", q, 3)
    s_q, h_q, d_qk = q.shape
    if d_qk not in SPARSE_PREFILL_DIMS or h_q < 1:
        raise ValueError(f"q: expected shape [s_q, h_q >= 1, d_qk in {SPARSE_PREFILL_DIMS}], got {list(q.shape)}")
    V.check_inner_contiguous("q", q)
    V.check_dtype("kv", kv, torch.bfloat16)
    V.check_shape("kv", kv, (None, 1, d_qk))
    V.check_inner_contiguous("kv", kv)
    V.check_dtype("indices", indices, torch.int32)
    V.check_shape("indices", indices, (s_q, 1, None))
    if indices.shape[2] < 1:
        raise ValueError(f"indices: expected topk >= 1 (dim 2), got shape {list(indices.shape)}")
    V.check_inner_contiguous("indices", indices)
    topk = indices.shape[2]
    attn_sink = _check_optional("attn_sink", attn_sink, torch.float32, (h_q,))
    topk_length = _check_optional("topk_length", topk_length, torch.int32, (s_q,))
    scale = _check_scale("sm_scale", sm_scale)
    if isinstance(d_v, bool) or not isinstance(d_v, numbers.Integral) or d_v != RM.HEAD_DIM_V:
        raise ValueError(f"d_v: expected {RM.HEAD_DIM_V}, got {d_v!r}")
    V.check_dtype("out", out, torch.bfloat16)
    V.check_shape("out", out, (s_q, h_q, d_v))
    V.check_inner_contiguous("out", out)
    for name, t in (("max_logits", max_logits), ("lse", lse)):
        V.check_dtype(name, t, torch.float32)
        V.check_shape(name, t, (s_q, h_q))
    inputs = dict(q=q, kv=kv, indices=indices, attn_sink=attn_sink, topk_length=topk_length)
    dev = V.check_same_device(**{n: t for n, t in inputs.items() if t is not None}, out=out, max_logits=max_logits,
                              lse=lse)
    if not V.is_fake(out):
        V.check_no_overlap("out", out, **inputs)
        V.check_no_overlap("max_logits", max_logits, out=out, **inputs)
        V.check_no_overlap("lse", lse, out=out, max_logits=max_logits, **inputs)
        if topk_length is not None and _host_values(topk_length):
            _check_topk_length_values(topk_length, topk)
    return SparsePrefillProblem(q, kv, indices, attn_sink, topk_length, out, max_logits, lse, scale, int(d_v), dev)


def _check_gpu_topk_length(p: SparsePrefillProblem):
    """topk_length of GPU tensors, read on the host (CPU ones: checked by the builder)."""
    if p.topk_length is not None and p.device.type != "cpu":
        _check_topk_length_values(p.topk_length.cpu(), p.indices.shape[2])


def _sparse_prefill_triton(p: SparsePrefillProblem):
    from ..triton import dsa_prefill as TP
    _check_gpu_topk_length(p)
    TP.flash_mla_sparse_fwd(p.q, p.kv, p.indices, p.attn_sink, p.topk_length, p.out, p.max_logits, p.lse, p.sm_scale)


def _sparse_prefill_reference(p: SparsePrefillProblem):
    _check_gpu_topk_length(p)
    o, m, lse = RD.flash_mla_sparse_fwd(p.q, p.kv, p.indices, p.sm_scale, p.d_v, p.attn_sink, p.topk_length)
    p.out.copy_(o)
    p.max_logits.copy_(m)
    p.lse.copy_(lse)


def new_sparse_prefill_outputs(q, d_v, out=None, max_logits=None, lse=None):
    """(out bf16 [s_q, h_q, d_v], max_logits, lse float32 [s_q, h_q]), each allocated where not given."""
    q = V.as_tensor("q", q)
    V.check_rank("q", q, 3)
    s_q, h_q = q.shape[:2]
    if out is None:
        out = torch.empty((s_q, h_q, V.check_int("d_v", d_v, lo=1)), dtype=torch.bfloat16, device=q.device)
    if max_logits is None:
        max_logits = torch.empty((s_q, h_q), dtype=torch.float32, device=q.device)
    if lse is None:
        lse = torch.empty((s_q, h_q), dtype=torch.float32, device=q.device)
    return out, max_logits, lse


def public_sparse_prefill_problem(q, kv, indices, sm_scale, d_v=RM.HEAD_DIM_V, attn_sink=None, topk_length=None, *,
                                  out=None, max_logits=None, lse=None):
    out, max_logits, lse = new_sparse_prefill_outputs(q, d_v, out, max_logits, lse)
    return sparse_prefill_problem(q, kv, indices, attn_sink, topk_length, out, max_logits, lse, sm_scale, d_v)


def _sparse_prefill_kernel(p: SparsePrefillProblem, executor: str):
    # the kernel checks topk_length (device error record: TopkLengthOutOfRange): no host read;
    # indices outside [0, s_kv) are unused slots here, not errors
    from ..cuda import dsa as CD
    CD.sparse_prefill(p.q, p.kv, p.indices, p.attn_sink, p.topk_length, p.out, p.max_logits, p.lse, p.sm_scale, p.d_v,
                      executor)


def _sparse_prefill_kernel_limits(p: SparsePrefillProblem):
    from ..cuda import dsa as CD
    CD.check_sparse_prefill_supported(p.q, p.kv, p.d_v)


SPARSE_PREFILL = registry.op("flash_mla_sparse_fwd", public_sparse_prefill_problem)
for _name in ("cuda", "emu"):
    SPARSE_PREFILL.add(B.kernel(_name, "mla_decode", _sparse_prefill_kernel, _sparse_prefill_kernel_limits))
SPARSE_PREFILL.add(B.triton(_sparse_prefill_triton))
SPARSE_PREFILL.add(B.reference(_sparse_prefill_reference))


def flash_mla_sparse_fwd_body(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor,
                              attn_sink: Optional[torch.Tensor], topk_length: Optional[torch.Tensor],
                              out: torch.Tensor, max_logits: torch.Tensor, lse: torch.Tensor, sm_scale: float,
                              d_v: int, backend: str) -> None:
    SPARSE_PREFILL(sparse_prefill_problem(q, kv, indices, attn_sink, topk_length, out, max_logits, lse, sm_scale,
                                          d_v), backend)


flash_mla_sparse_fwd_op = torch.library.custom_op("pykernels::flash_mla_sparse_fwd",
                                                  mutates_args=("out", "max_logits", "lse"))(flash_mla_sparse_fwd_body)


@flash_mla_sparse_fwd_op.register_fake
def _(q, kv, indices, attn_sink, topk_length, out, max_logits, lse, sm_scale, d_v, backend):
    sparse_prefill_problem(q, kv, indices, attn_sink, topk_length, out, max_logits, lse, sm_scale, d_v)
