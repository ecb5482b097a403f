"""Argument checks of pykernels.ep.Buffer, shared by every backend. Each error names the
argument, what was expected and what was given (docs/ep.md, "Validation")."""
import numbers

import torch

from ..runtime import validate as V
from ..runtime.hardware import SCALE_BLOCK, TMA_ALIGNMENT_BYTES

SUPPORTED_HIDDEN_MULTIPLE = SCALE_BLOCK   # FP8 scales cover 128 columns
MAX_HIDDEN = 16384
MAX_TOPK = 16
SUPPORTED_HIDDEN = f"a multiple of {SUPPORTED_HIDDEN_MULTIPLE} in [128, {MAX_HIDDEN}]"
MAX_EXPERTS = 2**31 - 1
KERNEL_ALIGNMENT_BYTES = TMA_ALIGNMENT_BYTES


def describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} {list(t.shape)}"
    return type(t).__name__


def check_hidden(name: str, h: int):
    if h % SUPPORTED_HIDDEN_MULTIPLE or not 0 < h <= MAX_HIDDEN:
        raise ValueError(f"{name}: hidden size {h} not supported: expected {SUPPORTED_HIDDEN}")


def check_num_experts(num_experts, num_ranks: int):
    if isinstance(num_experts, bool) or not isinstance(num_experts, numbers.Integral):
        raise TypeError(f"num_experts: expected an int, got {type(num_experts).__name__}")
    if num_experts <= 0 or num_experts % num_ranks:
        raise ValueError(f"num_experts: expected a positive multiple of the group size {num_ranks}, got {num_experts}")
    if num_experts > MAX_EXPERTS:
        raise ValueError(f"num_experts: expected at most {MAX_EXPERTS} (the per-expert counts are int32), "
                         f"got {num_experts}")


def check_device(name: str, t: torch.Tensor, device: torch.device):
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (that of x), got {t.device}")


def check_kernel_aligned(name: str, t: torch.Tensor, backend: str):
    """The EP kernels load rows with 16-byte vectors: a contiguous tensor (passed as it is;
    other layouts are copied first) needs a 16-byte aligned data pointer."""
    if t.is_contiguous():
        V.check_aligned(name, t, KERNEL_ALIGNMENT_BYTES,
                        f"the {backend!r} EP kernels load rows with {KERNEL_ALIGNMENT_BYTES}-byte vectors")


def check_topk(topk_idx, num_experts, num_ranks: int, num_tokens=None, range_check: bool = True, device=None):
    """topk_idx int64 [T, K], 1 <= K <= MAX_TOPK, values in [-1, num_experts), on `device`
    (x's) where given. The range check reads min/max back to the host (one sync);
    range_check=False leaves it to the caller (the kernel transports' device-side assert)."""
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype != torch.int64:
        got = topk_idx.dtype if isinstance(topk_idx, torch.Tensor) else type(topk_idx).__name__
        raise TypeError(f"topk_idx: expected an int64 tensor, got {got}")
    if topk_idx.dim() != 2:
        raise ValueError(f"topk_idx: expected shape [num_tokens, topk], got {list(topk_idx.shape)}")
    if not 1 <= topk_idx.shape[1] <= MAX_TOPK:
        raise ValueError(f"topk_idx: expected 1..{MAX_TOPK} experts per token, got {topk_idx.shape[1]}")
    if num_tokens is not None and topk_idx.shape[0] != num_tokens:
        raise ValueError(f"topk_idx: expected {num_tokens} rows (one per token of x), got {topk_idx.shape[0]}")
    check_num_experts(num_experts, num_ranks)
    if device is not None:
        check_device("topk_idx", topk_idx, device)
    if range_check and topk_idx.numel():
        lo, hi = (int(v) for v in torch.aminmax(topk_idx))
        if lo < -1 or hi >= num_experts:
            raise ValueError(f"topk_idx: expected values in [-1, {num_experts}), got range [{lo}, {hi}]")


def check_weights(topk_weights, shape, what="topk_idx", device=None):
    if not isinstance(topk_weights, torch.Tensor) or topk_weights.dtype != torch.float32:
        got = topk_weights.dtype if isinstance(topk_weights, torch.Tensor) else type(topk_weights).__name__
        raise TypeError(f"topk_weights: expected a float32 tensor, got {got}")
    if tuple(topk_weights.shape) != tuple(shape):
        raise ValueError(f"topk_weights: expected shape {list(shape)} (the shape of {what}), "
                         f"got {list(topk_weights.shape)}")
    if device is not None:
        check_device("topk_weights", topk_weights, device)


def check_x(x) -> torch.Tensor:
    """x: bf16 [T, H] or (e4m3 [T, H], float32 scales [T, H/128]). Returns the data tensor."""
    if isinstance(x, tuple):
        if len(x) != 2:
            raise TypeError(f"x: expected a bf16 tensor or a pair (e4m3 data, float32 scales), got a tuple of {len(x)}")
        data, scales = x
        if not isinstance(data, torch.Tensor) or data.dtype != torch.float8_e4m3fn:
            raise TypeError(f"x: expected FP8 data of dtype float8_e4m3fn, got "
                            f"{getattr(data, 'dtype', type(data).__name__)}")
    else:
        data = x
        if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16:
            raise TypeError(f"x: expected a bfloat16 tensor or an FP8 pair, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
    if data.dim() != 2:
        raise ValueError(f"x: expected shape [num_tokens, hidden], got {list(data.shape)}")
    check_hidden("x", data.shape[1])
    if isinstance(x, tuple):
        want = (data.shape[0], data.shape[1] // SUPPORTED_HIDDEN_MULTIPLE)
        if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32:
            raise TypeError(f"x scales: expected float32 {list(want)}, got {describe(scales)}")
        if tuple(scales.shape) != want:
            raise ValueError(f"x scales: expected float32 {list(want)}, got {scales.dtype} {list(scales.shape)}")
        if scales.device != data.device:
            raise ValueError(f"x scales: expected device {data.device} (that of x), got {scales.device}")
    return data


def check_layout_args(num_tokens, num_ranks, num_experts, num_tokens_per_rank, is_token_in_rank,
                      num_tokens_per_expert, device=None):
    R = num_ranks
    if num_tokens_per_rank is not None and (not isinstance(num_tokens_per_rank, torch.Tensor)
                                            or tuple(num_tokens_per_rank.shape) != (R,)):
        raise ValueError(f"num_tokens_per_rank: expected a tensor [{R}] (one per rank), got "
                         f"{describe(num_tokens_per_rank)}")
    if num_tokens_per_expert is not None and (not isinstance(num_tokens_per_expert, torch.Tensor)
                                              or tuple(num_tokens_per_expert.shape) != (num_experts,)):
        raise ValueError(f"num_tokens_per_expert: expected a tensor [{num_experts}] (num_experts), got "
                         f"{describe(num_tokens_per_expert)}")
    if is_token_in_rank is not None:
        if not isinstance(is_token_in_rank, torch.Tensor) or is_token_in_rank.dtype != torch.bool:
            raise TypeError(f"is_token_in_rank: expected a bool tensor [{num_tokens}, {R}], got "
                            f"{describe(is_token_in_rank)}")
        if tuple(is_token_in_rank.shape) != (num_tokens, R):
            raise ValueError(f"is_token_in_rank: expected shape [{num_tokens}, {R}], got "
                             f"{list(is_token_in_rank.shape)}")
        if device is not None:
            check_device("is_token_in_rank", is_token_in_rank, device)


def check_combine_args(x, handle, topk_weights, handle_type):
    if not isinstance(handle, handle_type):
        raise TypeError(f"handle: expected a DispatchHandle from dispatch, got {type(handle).__name__}")
    if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16:
        raise TypeError(f"x: expected a bfloat16 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    n = handle.num_recv
    if x.dim() != 2 or x.shape[0] != n:
        raise ValueError(f"x: expected shape [{n}, hidden] (the rows dispatch returned), got {list(x.shape)}")
    check_hidden("x", x.shape[1])
    if topk_weights is not None:
        if not isinstance(topk_weights, torch.Tensor) or topk_weights.dtype != torch.float32:
            raise TypeError(f"topk_weights: expected a float32 tensor, got "
                            f"{getattr(topk_weights, 'dtype', type(topk_weights).__name__)}")
        if topk_weights.dim() != 2 or topk_weights.shape[0] != n or not 1 <= topk_weights.shape[1] <= MAX_TOPK:
            raise ValueError(f"topk_weights: expected shape [{n}, topk] with 1 <= topk <= {MAX_TOPK} "
                             f"(one row per row of x), got {list(topk_weights.shape)}")
        check_device("topk_weights", topk_weights, x.device)


def check_worst_tokens(num_worst_tokens):
    if isinstance(num_worst_tokens, bool) or not isinstance(num_worst_tokens, numbers.Integral) \
            or not 0 <= num_worst_tokens < 2 ** 31:
        raise ValueError(f"num_worst_tokens: expected an int in [0, 2^31) (0: outputs sized by the received "
                         f"count), got {num_worst_tokens!r}")


def check_expert_alignment(expert_alignment):
    if isinstance(expert_alignment, bool) or not isinstance(expert_alignment, numbers.Integral) \
            or expert_alignment < 1:
        raise ValueError(f"expert_alignment: expected a positive int, got {expert_alignment!r}")
