"""The MLA split-KV schedule's contract and its per-step cache.

- `check_schedule(tile_scheduler_metadata, num_splits, cache_seqlens)`: on the host, the
  rules the decode kernels check on the device (csrc/mla/decode.cu, pykernels/triton/mla.py;
  docs/mla.md "Checks"): the metadata was made for these cache_seqlens, its rows cover every
  KV block of every sequence once, in order, and num_splits numbers the same splits.
- `MlaSchedule`: the object FlashMLA's argument-less `get_mla_metadata()` returns; the
  metadata is built on first use from the call's cache_seqlens and rebuilt when they change.

Metadata row p (int32 [8], columns reference.mla.METADATA_COLUMNS): first_batch,
first_block, last_batch, last_block_end, first_split, num_pieces, first_seqlen, last_seqlen.
Its pieces are the sequences first_batch .. last_batch (num_pieces of them): the first
starts at block first_block, the last ends (exclusive) at block last_block_end, the others
are whole; piece k has split id first_split + k. first_seqlen / last_seqlen are the tokens
of first_batch / last_batch the schedule was made for: only those two sequences' block
ranges are fixed by the row (a whole sequence inside a row is read up to its current
length), so they are what a later call must still match.
"""
import torch

from .reference.mla import METADATA_COLUMNS, METADATA_SIZE, PAGE_BLOCK_SIZE
from .runtime.hardware import cdiv, num_sms

ROW_TILE = 64         # query rows per CTA of the CUDA decode kernel (sizes num_sm_parts)

(FIRST_BATCH, FIRST_BLOCK, LAST_BATCH, LAST_BLOCK_END, FIRST_SPLIT, NUM_PIECES, FIRST_SEQLEN,
 LAST_SEQLEN) = range(METADATA_SIZE)
STALE_HINT = "call get_mla_metadata again after the sequences change"


def default_num_sm_parts(device: torch.device, num_q_tokens_per_head_k: int, num_heads_k: int) -> int:
    """SMs / (h_kv * row tiles of 64 query rows), at least 1: every (partition, KV head,
    row tile) is one CTA, so one wave fills the GPU."""
    return max(1, num_sms(device) // (num_heads_k * cdiv(num_q_tokens_per_head_k, ROW_TILE)))


def split_scratch(b: int, num_sm_parts: int, q_rows: int, head_dim_v: int, device):
    """The decode's split scratch: (oacc float32 [b + P, q_rows, head_dim_v], lacc float32
    [b + P, q_rows]), the split pieces' partial outputs and LSEs (a schedule has at most
    b + P - 1 pieces). Uninitialised: the combine reads only the rows the decode wrote."""
    max_splits = b + num_sm_parts
    return (torch.empty(max_splits, q_rows, head_dim_v, dtype=torch.float32, device=device),
            torch.empty(max_splits, q_rows, dtype=torch.float32, device=device))


def _blocks(seqlen: int) -> int:
    return cdiv(seqlen, PAGE_BLOCK_SIZE)


def _entry(p: int, col: int) -> str:
    return f"tile_scheduler_metadata: row {p}, {METADATA_COLUMNS[col]} (column {col})"


def _fail_entry(p: int, col: int, expected: str, got: int):
    raise ValueError(f"{_entry(p, col)}: expected {expected}, got {got}")


def _check_shapes(meta, num_splits, seqlens):
    for name, t, rank in (("tile_scheduler_metadata", meta, 2), ("num_splits", num_splits, 1),
                          ("cache_seqlens", seqlens, 1)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int32:
            raise TypeError(f"{name}: expected dtype int32, got {str(t.dtype).replace('torch.', '')}")
        if t.dim() != rank:
            raise ValueError(f"{name}: expected a {rank}-D tensor, got {t.dim()}-D")
    if meta.shape[0] < 1 or meta.shape[1] != METADATA_SIZE:
        raise ValueError(f"tile_scheduler_metadata: expected shape [num_sm_parts >= 1, {METADATA_SIZE}], "
                         f"got {list(meta.shape)}")
    b = seqlens.shape[0]
    if num_splits.shape[0] != b + 1:
        raise ValueError(f"num_splits: expected shape [{b + 1}] (b + 1 for cache_seqlens of shape [{b}]), "
                         f"got {list(num_splits.shape)}")


def _row_end(row, seqlens):
    """(batch, block, split) where the row after `row` must start."""
    fb, fblk, lb, lend, fs, n = row[:6]
    if n == 0:
        return fb, fblk, fs
    if lend < _blocks(seqlens[lb]):
        return lb, lend, fs + n          # the last sequence continues on the next row
    return lb + 1, 0, fs + n


def check_schedule(tile_scheduler_metadata: torch.Tensor, num_splits: torch.Tensor,
                   cache_seqlens: torch.Tensor) -> None:
    """Check a schedule against the cache_seqlens of a decode call (host reads: meant for
    CPU tensors). tile_scheduler_metadata int32 [num_sm_parts, 8], num_splits int32
    [b + 1], cache_seqlens int32 [b]. Raises ValueError (TypeError for a dtype) naming
    the argument, what was expected and what was given, when:
    - a row was made for other seqlens (its first_seqlen / last_seqlen differ: stale);
    - an entry is out of range (batch indices, block ranges, split ids: at most b +
      num_sm_parts splits, the size of the decode's split scratch);
    - the rows do not continue one another: row 0 starts at (batch 0, block 0, split 0),
      each row (an empty one too: num_pieces 0) starts where the previous one ended, and
      the last row ends after the last block of batch b - 1;
    - num_splits is not the prefix count of those splits (num_splits[i] = the split id
      of sequence i's first piece, num_splits[b] = the number of splits).
    """
    _check_shapes(tile_scheduler_metadata, num_splits, cache_seqlens)
    rows = tile_scheduler_metadata.tolist()
    ns = num_splits.tolist()
    seqlens = cache_seqlens.tolist()
    b, parts = len(seqlens), len(rows)
    max_splits = b + parts
    for i, L in enumerate(seqlens):
        if L < 0:
            raise ValueError(f"cache_seqlens: expected values >= 0, got {L} (batch {i})")
    start = (0, 0, 0)
    for p, row in enumerate(rows):
        fb, fblk, lb, lend, fs, n, made_first, made_last = row
        if not 0 <= n <= b:
            _fail_entry(p, NUM_PIECES, f"a piece count in [0, {b}] (b = {b})", n)
        if n:
            if not 0 <= fb < b:
                _fail_entry(p, FIRST_BATCH, f"a batch index in [0, {b})", fb)
            if n > b - fb:
                _fail_entry(p, NUM_PIECES, f"at most {b - fb} pieces from first_batch {fb} (b = {b})", n)
            if lb != fb + n - 1:
                _fail_entry(p, LAST_BATCH, f"first_batch + num_pieces - 1 = {fb + n - 1}", lb)
            for bi, made in ((fb, made_first), (lb, made_last)):
                if made != seqlens[bi]:
                    raise ValueError(f"tile_scheduler_metadata: row {p} was made for other cache_seqlens "
                                     f"(batch {bi}: made for {made} tokens, called with {seqlens[bi]}); "
                                     f"{STALE_HINT}")
            nb_first, nb_last = _blocks(seqlens[fb]), _blocks(seqlens[lb])
            if not 0 <= lend <= nb_last:
                _fail_entry(p, LAST_BLOCK_END, f"a block index in [0, {nb_last}] (batch {lb} has {nb_last} "
                            f"blocks of {PAGE_BLOCK_SIZE})", lend)
            first_hi = max(nb_first, 1) if n > 1 else min(max(nb_first, 1), lend + 1)
            if not 0 <= fblk < first_hi:
                _fail_entry(p, FIRST_BLOCK, f"a block index in [0, {first_hi}) (batch {fb} has {nb_first} blocks"
                            f"{', and the piece ends at last_block_end' if n == 1 else ''})", fblk)
            if not 0 <= fs <= max_splits - n:
                _fail_entry(p, FIRST_SPLIT, f"a split id in [0, {max_splits - n}] (at most b + num_sm_parts = "
                            f"{max_splits} splits)", fs)
        for col, want, got in zip((FIRST_BATCH, FIRST_BLOCK, FIRST_SPLIT), start, (fb, fblk, fs)):
            if want != got:
                where = "row 0 starts at batch 0, block 0, split 0" if p == 0 else f"where row {p - 1} ended"
                _fail_entry(p, col, f"{want} ({where})", got)
        start = _row_end(row, seqlens)
    if start[:2] != (b, 0):
        last = _blocks(seqlens[b - 1]) if b else 0
        raise ValueError(f"tile_scheduler_metadata: expected the rows to end after the last block of batch "
                         f"{b - 1} (block {last}), got rows ending at batch {start[0]}, block {start[1]}: "
                         f"the rest of the sequences is in no row")
    if ns[b] != start[2]:
        raise ValueError(f"num_splits: expected num_splits[{b}] = {start[2]} (the number of splits in "
                         f"tile_scheduler_metadata), got {ns[b]}")
    for p, row in enumerate(rows):
        fb, fblk, lb, lend, fs, n = row[:6]
        for k in range(n):
            bi = fb + k
            lo, hi = (fblk if k == 0 else 0), (lend if bi == lb else _blocks(seqlens[bi]))
            sid = fs + k
            if lo == 0 and ns[bi] != sid:
                raise ValueError(f"num_splits: expected num_splits[{bi}] = {sid} (the split id of batch {bi}'s "
                                 f"first piece, row {p} of tile_scheduler_metadata), got {ns[bi]}")
            if hi == _blocks(seqlens[bi]) and ns[bi + 1] != sid + 1:
                raise ValueError(f"num_splits: expected num_splits[{bi + 1}] = {sid + 1} (one past the split id "
                                 f"of batch {bi}'s last piece, row {p} of tile_scheduler_metadata), got {ns[bi + 1]}")


class MlaSchedule:
    """A decode step's schedule, as FlashMLA's argument-less `get_mla_metadata()` returns it:
    the metadata is built on first use from the call's cache_seqlens and reused by the
    later calls of the step (every layer), rebuilt when the seqlens change.

    A change is seen without reading the seqlens on the GPU: the cache key is the seqlens
    tensor's address, shape, strides, device and PyTorch version counter (which every
    in-place write through PyTorch bumps), and the tensor is kept alive so no other tensor
    can take its address. CPU seqlens are keyed by their values (a host read is free).
    Not seen: writes that bypass the version counter (through a NumPy / DLPack view, or a
    CUDA graph replaying a copy into the tensor); inference tensors have no version
    counter, so for them the schedule is rebuilt on every call. A missed change still
    cannot give a wrong answer silently: the decode kernels record a stale schedule
    (first_seqlen / last_seqlen) as an input error.
    """

    def __init__(self):
        self._key = None
        self._seqlens = None        # the tensor the schedule was built from (kept alive)
        self._result = None
        self.builds = 0             # how many times the metadata was built

    @staticmethod
    def _key_of(seqlens: torch.Tensor, ints: tuple):
        if seqlens.device.type == "cpu":
            return ("values", tuple(seqlens.tolist()), seqlens.dtype) + ints
        if seqlens.is_inference():
            return None             # no version counter: never reuse
        return ("version", seqlens.data_ptr(), seqlens._version, tuple(seqlens.shape), seqlens.stride(),
                seqlens.dtype, seqlens.device) + ints

    def resolve(self, cache_seqlens: torch.Tensor, num_q_tokens_per_head_k: int, num_heads_k: int,
                num_sm_parts: int, build):
        """(tile_scheduler_metadata int32 [num_sm_parts, 8], num_splits int32 [b + 1]) for
        cache_seqlens int32 [b]: the cached pair when nothing changed since the last call,
        else build(cache_seqlens, num_sm_parts) (the API's metadata builder), kept for the
        next call. While torch.compile traces, build is called every time (no cache)."""
        if torch.compiler.is_compiling():
            return build(cache_seqlens, num_sm_parts)
        key = self._key_of(cache_seqlens, (int(num_q_tokens_per_head_k), int(num_heads_k), int(num_sm_parts)))
        if key is None or key != self._key:
            self._result = tuple(build(cache_seqlens, num_sm_parts))
            self._key, self._seqlens = key, cache_seqlens
            self.builds += 1
        return self._result


__all__ = ["check_schedule", "default_num_sm_parts", "split_scratch", "MlaSchedule"]
