"""Reference expert-parallel routing, computed for all ranks in one process.

Conventions (shared by every EP implementation in pykernels):
- num_experts E is split evenly over R ranks; rank r holds experts [r*E/R, (r+1)*E/R).
- A token goes to each rank that holds at least one of its top-k experts, once per
  rank. topk_idx -1 means "no expert" for that slot.
- Received tokens are ordered by source rank, then by token index at the source.
- Received top-k indices are local expert ids (global - r*E/R), -1 where the expert is
  on another rank; the matching weights are 0.
- combine sends each received row back and sums the rows of a token in destination-
  rank order (deterministic), in float32 starting from 0.0; with weights, each row is
  first scaled by the sum of its local top-k weights (`weight_sum`: float32, added left
  to right from 0.0), the product rounded to float32 before it is added.
"""
import torch


def dispatch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    """topk_idx int64 [T, K] -> (num_tokens_per_rank int32 [R], num_tokens_per_expert
    int32 [E], is_token_in_rank bool [T, R])."""
    per_rank = num_experts // num_ranks
    valid = topk_idx >= 0
    experts = topk_idx.clamp(min=0)
    per_expert = torch.zeros(num_experts, dtype=torch.int32, device=topk_idx.device)
    per_expert.index_add_(0, experts[valid], torch.ones_like(experts[valid], dtype=torch.int32))
    in_rank = torch.zeros(topk_idx.shape[0], num_ranks, dtype=torch.bool, device=topk_idx.device)
    rows = torch.arange(topk_idx.shape[0], device=topk_idx.device)[:, None].expand_as(topk_idx)
    in_rank[rows[valid], (experts // per_rank)[valid]] = True
    return in_rank.sum(0, dtype=torch.int32), per_expert, in_rank


def localize_topk(topk_idx, topk_weights, rank: int, experts_per_rank: int):
    """Global expert ids -> this rank's local ids (-1 elsewhere); weights zeroed there."""
    local = topk_idx - rank * experts_per_rank
    mine = (topk_idx >= 0) & (local >= 0) & (local < experts_per_rank)
    idx = torch.where(mine, local, torch.full_like(local, -1))
    w = None if topk_weights is None else torch.where(mine, topk_weights, torch.zeros_like(topk_weights))
    return idx, w


def weight_sum(topk_weights: torch.Tensor) -> torch.Tensor:
    """float [N, K] -> float32 [N]: 0.0 + w[:, 0] + w[:, 1] + ... in that order (a fixed
    order every backend repeats; torch's sum may reorder)."""
    s = torch.zeros(topk_weights.shape[0], dtype=torch.float32, device=topk_weights.device)
    for k in range(topk_weights.shape[1]):
        s = s + topk_weights[:, k].float()
    return s


def simulate_dispatch(xs, topk_idxs, topk_weights, num_experts: int):
    """All ranks at once. xs[r] [T_r, H]; topk_idxs[r] int64 [T_r, K]; topk_weights[r]
    float32 [T_r, K]. Returns per destination rank a dict with recv_x, recv_topk_idx,
    recv_topk_weights, recv_src (int64 [N, 2]: source rank, source token) and
    num_recv_tokens_per_expert (list of ints)."""
    ranks = len(xs)
    per_rank = num_experts // ranks
    out = []
    for dst in range(ranks):
        rows_x, rows_i, rows_w, src = [], [], [], []
        for s in range(ranks):
            _, _, in_rank = dispatch_layout(topk_idxs[s], num_experts, ranks)
            tok = in_rank[:, dst].nonzero().flatten()
            rows_x.append(xs[s][tok])
            rows_i.append(topk_idxs[s][tok])
            rows_w.append(topk_weights[s][tok])
            src.append(torch.stack([torch.full_like(tok, s), tok], 1))
        idx, w = localize_topk(torch.cat(rows_i), torch.cat(rows_w), dst, per_rank)
        counts = [int((idx == e).sum()) for e in range(per_rank)]
        out.append(dict(recv_x=torch.cat(rows_x), recv_topk_idx=idx, recv_topk_weights=w,
                        recv_src=torch.cat(src), num_recv_tokens_per_expert=counts))
    return out


def simulate_combine(recv_xs, recv_srcs, num_tokens, recv_weights=None):
    """Inverse of simulate_dispatch: per source rank, float32 [T_r, H] sums of the rows
    returned by each destination rank, added in destination-rank order."""
    hidden = recv_xs[0].shape[1]
    outs = [torch.zeros(t, hidden, dtype=torch.float32) for t in num_tokens]
    for dst, (x, src) in enumerate(zip(recv_xs, recv_srcs)):
        rows = x.float()
        if recv_weights is not None:
            rows = rows * weight_sum(recv_weights[dst])[:, None]
        for i in range(rows.shape[0]):
            outs[int(src[i, 0])][int(src[i, 1])] += rows[i]
    return outs
