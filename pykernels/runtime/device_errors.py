"""The device error record: input checks that need device data (a block_table entry, an
m_indices value) are made by the kernels themselves, so no host read breaks CUDA graphs.

A kernel that finds bad data records the first error in an int32 [RECORD_WORDS] record
(csrc/include/pk/error_record.cuh: valid code, then three int arguments and the CTA),
skips the bad work (never reading or writing out of bounds), and finishes. The host raises
the record as a KernelInputError:
- on the emulator ("emu" backend), right after the launch (CPU backends raise at once);
- on the GPU, at `pykernels.check_errors()` and at the next pykernels call that
  synchronises anyway.

The code table below and the enum in error_record.cuh are one contract: a test checks
that they agree.
"""
import dataclasses

import torch

RECORD_WORDS = 8          # code, arg0, arg1, arg2, cta.x, cta.y, cta.z, reserved
NO_KERNEL = (-1, -1, -1)  # the CTA words of an error recorded by torch ops (record_first), not a kernel


@dataclasses.dataclass(frozen=True)
class ErrorCode:
    name: str            # the enumerator in error_record.cuh (without the kErr prefix)
    argument: str        # the argument the error is about
    template: str        # message; {a0} {a1} {a2} are the record's arguments


# code -> ErrorCode. Add codes here and in error_record.cuh (same number and name).
CODES = {
    1: ErrorCode("MIndexOutOfRange", "m_indices",
                 "expected values in [-1, {a1}) (-1 marks padding rows), got {a0} at row {a2}"),
    2: ErrorCode("MaskedMOutOfRange", "masked_m",
                 "expected values in [0, {a1}] (a's rows per group), got {a0} for group {a2}"),
    3: ErrorCode("BlockTableOutOfRange", "block_table",
                 "expected page ids in [0, {a1}) (the cache's pages) for the pages in use, got {a0} (batch {a2})"),
    4: ErrorCode("SeqlenOutOfRange", "cache_seqlens",
                 "expected values in [0, {a1}] (the block table's pages x 64), got {a0} (batch {a2})"),
    5: ErrorCode("MetadataStale", "tile_scheduler_metadata",
                 "was made for other cache_seqlens (batch {a2}: made for {a1} tokens, called with {a0}); "
                 "call get_mla_metadata again after the sequences change"),
    6: ErrorCode("MetadataOutOfRange", "tile_scheduler_metadata",
                 "entry {a2} (row * 8 + column) out of range: expected a value in [0, {a1}), got {a0}"),
    7: ErrorCode("NumSplitsMismatch", "num_splits",
                 "expected num_splits[{a2}] = {a1} (the split numbering of tile_scheduler_metadata: the first "
                 "split id of each sequence, then the number of splits), got {a0}"),
    8: ErrorCode("MetadataMismatch", "tile_scheduler_metadata",
                 "entry {a2} (row * 8 + column): expected {a1}, got {a0} (row 0 starts at batch 0, block 0, "
                 "split 0, each row where the previous one ended, and the last row ends after the last block "
                 "of batch b - 1)"),
    9: ErrorCode("ContextLensOutOfRange", "context_lens",
                 "expected values in [0, {a1}] (the logits' columns and the block table's pages x the page size), "
                 "got {a0} at flat index {a2}"),
    10: ErrorCode("WindowStartOutOfRange", "cu_seqlen_ks",
                  "expected values in [0, {a1}] (the keys), got {a0} at row {a2}"),
    11: ErrorCode("WindowEndOutOfRange", "cu_seqlen_ke",
                  "expected values in [cu_seqlen_ks[row], {a1}] (the keys), got {a0} at row {a2}"),
    12: ErrorCode("SparseIndexOutOfRange", "indices",
                  "expected -1 or a token row in [0, {a1}) (k_cache's pages x 64) in the used slots, got {a0} at "
                  "flat index {a2} (batch, query token, slot)"),
    13: ErrorCode("TopkLengthOutOfRange", "topk_length",
                  "expected values in [0, {a1}] (indices' topk), got {a0} at index {a2}"),
    # recorded by torch ops (record_first), not a kernel: compat.deep_gemm's prefix-sum layout
    14: ErrorCode("GroupEndOutOfRange", "grouped_layout",
                  "expected non-decreasing group end rows in [0, {a1}] (a's rows), got {a0} at index {a2}"),
}


def code(name: str) -> int:
    """The number of the code named `name` (the enumerator without its kErr prefix)."""
    for number, spec in CODES.items():
        if spec.name == name:
            return number
    raise KeyError(f"name: expected one of {[s.name for s in CODES.values()]}, got {name!r}")


def describe(name: str, a0: int, a1: int, a2: int) -> str:
    """The message of the code named `name` with its three arguments, "argument: text": the
    same words whether a kernel found the error or a host check on CPU tensors did."""
    spec = CODES[code(name)]
    return f"{spec.argument}: " + spec.template.format(a0=a0, a1=a1, a2=a2)


class KernelInputError(ValueError):
    """Bad input found by a kernel on the device (see pykernels.runtime.device_errors)."""

    def __init__(self, op: str, code: int, args: tuple, cta: tuple):
        spec = CODES.get(code)
        if spec is None:
            msg = f"{op}: the kernel recorded unknown error code {code} (args {args}, CTA {cta})"
            argument = None
        else:
            by_torch = tuple(cta) == NO_KERNEL
            where = "on the device by torch ops, not a kernel" if by_torch else f"by the kernel, CTA {cta}"
            msg = f"{op}: {describe(spec.name, *args)} [found {where}]"
            argument = spec.argument
        super().__init__(msg)
        self.op, self.code, self.argument, self.args_recorded, self.cta = op, code, argument, args, cta


_RECORDS = {}        # device -> (int32 [RECORD_WORDS] tensor, name of the last op that used it)


def device_key(device) -> torch.device:
    """`device` with its index: "cuda" is the current CUDA device, so that a record made for
    a tensor on cuda:0 is the one check_errors("cuda") reads."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def record_for(device: torch.device, op: str) -> torch.Tensor:
    """The error record kernels on `device` write to (zeroed once, when first made); `op`
    names the launching op in the message of an error raised later."""
    device = device_key(device)
    entry = _RECORDS.get(device)
    if entry is None:
        entry = [torch.zeros(RECORD_WORDS, dtype=torch.int32, device=device), op]
        _RECORDS[device] = entry
    entry[1] = op
    return entry[0]


def record_first(record: torch.Tensor, code_number: int, bad: torch.Tensor, values: torch.Tensor,
                 bound: int) -> None:
    """Record `code_number` for the first True of `bad` (bool [n]) as (values[i], bound, i),
    CTA NO_KERNEL, unless an error is recorded already: what a kernel's check does, as
    torch ops on the record's device (no host read), for work done without a kernel."""
    if bad.numel() == 0:
        return
    i = torch.argmax(bad.to(torch.int32)).view(1)           # a tensor index, never a host int
    dev = record.device

    def word(v):
        return torch.full((1,), v, dtype=torch.int32, device=dev)
    words = torch.cat([word(code_number), values.index_select(0, i).to(torch.int32), word(bound),
                       i.to(torch.int32), torch.tensor(NO_KERNEL + (0,), dtype=torch.int32, device=dev)])
    record.copy_(torch.where(bad.any() & (record[0] == 0), words, record))


def raise_if_set(record: torch.Tensor, op: str) -> None:
    """Read `record` (a host read: a synchronisation on the GPU), clear it, and raise its
    error as KernelInputError if one was recorded."""
    words = record.cpu().tolist()
    if words[0] == 0:
        return
    record.zero_()
    raise KernelInputError(op, words[0], tuple(words[1:4]), tuple(words[4:7]))


def check_errors(device=None) -> None:
    """Raise the first input error a kernel recorded on `device` (every device with a
    record when None) since the last check, as KernelInputError; a host synchronisation."""
    devices = [device_key(device)] if device is not None else list(_RECORDS)
    for d in devices:
        entry = _RECORDS.get(d)
        if entry is not None:
            raise_if_set(entry[0], entry[1])
