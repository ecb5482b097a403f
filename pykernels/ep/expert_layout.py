"""The expert side's layout of a normal-mode dispatch: received rows grouped per local
expert, in the contiguous layout of pykernels.gemm.m_grouped_fp8_gemm_nt_contiguous
(DeepGEMM's), so dispatch -> grouped GEMM -> combine needs no permutation in between.

A received row (one per (source rank, source token), DeepEP's normal mode) that names
several local experts appears once per (row, k) in the grouped layout. Expert le's segment
holds its (row, k) pairs in received-row order (then k), followed by padding rows up to a
multiple of `alignment` (get_mk_alignment_for_contiguous_layout(): 128); an expert with no
pair has no segment. m_indices int32 gives each grouped row's local expert, -1 on padding
rows (the GEMM leaves their output untouched; combine never reads them).

Combine takes the grouped expert outputs back (the caller has weighted each grouped row by
the weight dispatch returned for it, 0 on padding rows): each received row becomes the
float32 sum, from 0.0 in k order, of its grouped rows, rounded to bf16 once; the Buffer then
combines those rows as any others (DeepEP's combine: summed over destination ranks in
float32, rounded to bf16). The layout costs one host read (the segment sizes), like the
engine's normal dispatch.
"""
import dataclasses

import torch

from ..runtime.hardware import round_up


@dataclasses.dataclass
class ExpertLayout:
    """One rank's grouping of its received rows (N rows, top-k K, E_l local experts).

    pos int64 [N, K]: the grouped row of (received row n, slot k), -1 where slot k names
    no local expert; row_of int64 [m_sum]: the received row of each grouped row, -1 on
    padding rows; m_indices int32 [m_sum]: its local expert, -1 on padding rows;
    weights float32 [m_sum]: the top-k weight of its (row, k) pair, 0 on padding rows;
    num_rows_per_expert: list of E_l segment sizes (pairs rounded up to alignment);
    num_pairs_per_expert: list of E_l (row, k) pair counts; alignment: the segment multiple."""
    pos: torch.Tensor
    row_of: torch.Tensor
    m_indices: torch.Tensor
    weights: torch.Tensor
    num_rows_per_expert: list
    num_pairs_per_expert: list
    alignment: int

    @property
    def num_rows(self) -> int:
        return self.row_of.shape[0]


def contiguous_layout(recv_topk_idx: torch.Tensor, recv_topk_weights, num_local_experts: int,
                      alignment: int) -> ExpertLayout:
    """recv_topk_idx int64 [N, K] local expert ids (-1 elsewhere); recv_topk_weights
    float32 [N, K] or None (weights 1) -> ExpertLayout. Reads the per-expert pair counts
    back to the host (the grouped row count)."""
    N, K = recv_topk_idx.shape
    dev = recv_topk_idx.device
    flat = recv_topk_idx.reshape(-1)
    valid = flat >= 0
    key = torch.where(valid, flat, torch.full_like(flat, num_local_experts))
    sorted_key, perm = torch.sort(key, stable=True)                  # (expert, row, k) order
    pairs = torch.bincount(key, minlength=num_local_experts + 1)[:num_local_experts]
    pairs_list = pairs.tolist()
    rows_list = [round_up(p, alignment) for p in pairs_list]
    seg_start = torch.tensor([0] + rows_list[:-1], dtype=torch.int64, device=dev).cumsum(0)
    m_sum = sum(rows_list)

    first = torch.searchsorted(sorted_key, sorted_key)
    within = torch.arange(flat.numel(), device=dev) - first
    is_pair = sorted_key < num_local_experts
    grouped = torch.where(is_pair, seg_start[sorted_key.clamp(max=num_local_experts - 1)] + within,
                          torch.full_like(within, -1))
    pos = torch.empty_like(flat)
    pos[perm] = grouped
    pos = pos.view(N, K)

    src = perm[is_pair]
    dst = grouped[is_pair]
    row_of = torch.full((m_sum,), -1, dtype=torch.int64, device=dev)
    row_of[dst] = src // K
    m_indices = torch.full((m_sum,), -1, dtype=torch.int32, device=dev)
    m_indices[dst] = sorted_key[is_pair].to(torch.int32)
    weights = torch.zeros(m_sum, dtype=torch.float32, device=dev)
    if recv_topk_weights is None:
        weights[dst] = 1.0
    else:
        weights[dst] = recv_topk_weights.reshape(-1)[src].float()
    return ExpertLayout(pos, row_of, m_indices, weights, rows_list, pairs_list, alignment)


def group_rows(recv_x, layout: ExpertLayout):
    """recv_x bf16 [N, H] or (e4m3 [N, H], float32 [N, H/128]) -> the same kind with
    layout.num_rows rows in the grouped order; padding rows are zeros (scales too)."""
    pad = layout.row_of < 0
    src = layout.row_of.clamp(min=0)

    def take(t):
        rows = t[src]
        return rows.view(torch.uint8).masked_fill_(pad[:, None], 0).view(t.dtype)
    if isinstance(recv_x, tuple):
        return take(recv_x[0]), take(recv_x[1])
    return take(recv_x)


def ungroup_rows(y: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """y [m_sum, H] (the grouped expert outputs; padding rows not read) -> float32 [N, H]:
    per received row, the sum over its pairs in k order of f32(y[pos]) from 0.0."""
    N, K = layout.pos.shape
    acc = torch.zeros(N, y.shape[1], dtype=torch.float32, device=y.device)
    if not y.shape[0]:
        return acc                     # no received row names a local expert
    for k in range(K):
        p = layout.pos[:, k]
        acc = torch.where((p >= 0)[:, None], acc + y[p.clamp(min=0)].float(), acc)
    return acc


# ---------------------------------------------------------------------------------------
# Buffer's expert_layout option (normal-mode dispatch / combine)
# ---------------------------------------------------------------------------------------
EXPERT_LAYOUTS = (None, "contiguous")


def check_expert_layout(expert_layout, topk_idx, handle, num_worst_tokens) -> None:
    """Buffer.dispatch(expert_layout=...): None (rows by source rank, source token) or
    "contiguous" (grouped per local expert); the grouping needs the dispatch's top-k ids."""
    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert_layout: expected one of {EXPERT_LAYOUTS}, got {expert_layout!r}")
    if expert_layout is None:
        return
    if topk_idx is None or handle is not None:
        raise ValueError("expert_layout: needs topk_idx and no cached handle (rows are grouped by the top-k ids "
                         "this dispatch sends)")
    if num_worst_tokens:
        raise ValueError(f"expert_layout: not supported with num_worst_tokens={num_worst_tokens} (the grouped row "
                         f"count is read on the host)")


def segment_alignment(expert_alignment: int) -> int:
    """Segment multiple of the contiguous layout: expert_alignment when > 1, else the
    grouped GEMM's get_mk_alignment_for_contiguous_layout()."""
    from ..gemm import get_mk_alignment_for_contiguous_layout
    return expert_alignment if expert_alignment > 1 else get_mk_alignment_for_contiguous_layout()


def to_expert_layout(recv_x, recv_topk_idx, recv_topk_weights, num_local_experts: int, alignment: int):
    """A dispatch's received rows -> (grouped recv_x, ExpertLayout)."""
    layout = contiguous_layout(recv_topk_idx, recv_topk_weights, num_local_experts, alignment)
    return group_rows(recv_x, layout), layout


def from_expert_layout(x, layout: ExpertLayout, topk_weights) -> torch.Tensor:
    """combine's input in the grouped layout (bf16 [m_sum, H], the expert outputs,
    weighted by the caller) -> bf16 [N, H] per received row: the float32 sum of its
    grouped rows in k order, rounded to bf16 (then combined as any received row)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.bfloat16:
        raise TypeError(f"x: expected bfloat16 [{layout.num_rows}, hidden] (the expert outputs in the dispatch's "
                        f"contiguous layout), got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 2 or x.shape[0] != layout.num_rows:
        raise ValueError(f"x: expected shape [{layout.num_rows}, hidden] (the grouped rows dispatch returned), got "
                         f"{list(x.shape)}")
    if topk_weights is not None:
        raise ValueError("topk_weights: expected None with an expert_layout handle (weight the grouped rows by the "
                         "weights dispatch returned before combine)")
    return ungroup_rows(x, layout).to(torch.bfloat16)
