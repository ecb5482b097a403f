"""The handle Buffer.dispatch returns: DeepEP's six-tuple, plus what pykernels' transports
need, as attributes.

As a tuple it is DeepEP's intranode handle, so code that unpacks or indexes it works:
  [0] rank_prefix_matrix int32 [R, R]: [s, d] = tokens ranks 0..s send to rank d;
  [1] channel_prefix_matrix int32 [R, C]: [d, c] = tokens this rank sends to rank d in
      channels before c (the engine path has one channel: zeros [R, 1]);
  [2] recv_channel_prefix_matrix int32 [R, C]: [s, c] = rows received from rank s in
      channels before c (zeros [R, 1] on the engine path);
  [3] recv_src_idx int32 [N]: the source token of each received row;
  [4] is_token_in_rank bool [T, R];
  [5] send_head int32 [T, R]: the position of token t among the tokens sent to rank r,
      -1 where it is not sent (DeepEP stores ring positions there; the meaning differs).
Attributes (not part of the tuple): kind ("engine" or the kernel transport's), rank,
num_tokens T, num_recv (rows of the dispatch outputs: N, or num_worst_tokens),
num_worst_tokens, and the transport's own fields (send_idx, send_counts, recv_counts,
send_pos: the row in the send buffer, for the engine; `intranode` for the kernels).
"""
import torch


class DispatchHandle(tuple):
    """DeepEP's handle tuple with pykernels' fields as attributes (module docstring)."""

    FIELDS = ("rank_prefix_matrix", "channel_prefix_matrix", "recv_channel_prefix_matrix", "recv_src_idx",
              "is_token_in_rank", "send_head")

    @classmethod
    def make(cls, count_matrix, recv_src_idx, is_token_in_rank, send_head, channel_prefix=None,
             recv_channel_prefix=None, **attrs):
        R = count_matrix.shape[0]
        dev = is_token_in_rank.device
        zeros = torch.zeros(R, 1, dtype=torch.int32, device=dev)
        h = cls((torch.cumsum(count_matrix, 0).to(torch.int32).to(dev),
                 zeros if channel_prefix is None else channel_prefix,
                 zeros.clone() if recv_channel_prefix is None else recv_channel_prefix,
                 recv_src_idx.to(torch.int32), is_token_in_rank, send_head.to(torch.int32)))
        h.__dict__.update(attrs)
        h.num_recv = attrs.get("num_recv", recv_src_idx.shape[0])
        return h

    def __getattr__(self, name):
        if name in DispatchHandle.FIELDS:
            return self[DispatchHandle.FIELDS.index(name)]
        raise AttributeError(f"DispatchHandle has no attribute {name!r}")

    def __reduce__(self):   # keep the attributes through copy / pickle
        return (_rebuild, (tuple(self), dict(self.__dict__)))


def _rebuild(items, attrs):
    h = DispatchHandle(items)
    h.__dict__.update(attrs)
    return h


def send_positions(is_token_in_rank: torch.Tensor) -> torch.Tensor:
    """int32 [T, R]: the position of each token among the tokens sent to each rank (token
    order), -1 where not sent."""
    pos = torch.cumsum(is_token_in_rank.to(torch.int32), 0) - 1
    return torch.where(is_token_in_rank, pos, torch.full_like(pos, -1)).to(torch.int32)
