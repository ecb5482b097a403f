"""MLA input checks that need the values of device tensors (docs/mla.md "Checks"):
the schedule contract on the host (pykernels.mla_schedule.check_schedule), the same checks
made by the decode kernels into the device error record (the hand-written kernel on the
emulator, backend "emu"; the Triton kernel interpreted), the scheduler at the int32
limits, and the per-step schedule cache (MlaSchedule).

The kernels are called through the lower layers (pykernels.cuda.mla / pykernels.triton.mla):
the public API checks CPU tensors on the host before any kernel runs.
"""
import random

import pytest
import torch
import triton
import triton.language as tl

from pykernels.cuda import mla as CM
from pykernels.mla_schedule import MlaSchedule, check_schedule
from pykernels.reference import mla as RM
from pykernels.runtime import device_errors
from pykernels.runtime.device_errors import KernelInputError
from pykernels.triton import mla as TM
from pykernels.triton.mla import _check_partition

from .mla_cases import PAGE, check_decode, make_problem, poisoned

BACKENDS = ("emu", "triton")
CODE = {spec.name: number for number, spec in device_errors.CODES.items()}


def _decode(backend, q, cache, table, sl, meta, ns, causal=True):
    """The decode by `backend` ("emu" or "cuda": the CUDA kernel; "triton") into NaN-poisoned
    out / lse on q's device (returned); the error record is not read."""
    out, lse = (t.to(q.device) for t in poisoned(*q.shape[:3]))
    if backend in ("emu", "cuda"):
        CM.flash_mla_with_kvcache(q, cache, table, sl, meta, ns, out, lse, 512, None, causal, executor=backend)
    else:
        TM.flash_mla_with_kvcache(q, cache, table, sl, meta, ns, out, lse, 512, None, causal)
    return out, lse


def _assert_matches_reference(out, lse, q, cache, table, sl, causal=True):
    check_decode(out, lse, *RM.flash_mla_with_kvcache(q, cache, table, sl, 512, None, causal))


# The problem of the device-check cases: 3 sequences over 6 partitions. Reference schedule
# (blocks [5, 1, 2], capacity 9): row 0 = sequence 0 blocks [0, 4), row 1 = sequence 0
# [4, 5) (split in two), row 2 = sequence 1, row 3 = sequence 2, rows 4-5 empty.
SEQLENS, S_Q, H_Q, PARTS = [300, 2, 70], 1, 16, 6


def _extend(cache, table, seqlens, i, new_len):
    """Append random keys to sequence i of a make_problem cache up to new_len tokens, taking
    pages no sequence uses for its new pages."""
    used = set(table[table >= 0].tolist())
    spare = [pg for pg in range(cache.shape[0]) if pg not in used]
    for t in range(int(seqlens[i]), new_len):
        if table[i, t // PAGE] < 0:
            table[i, t // PAGE] = spare.pop(0)
        cache[table[i, t // PAGE], t % PAGE] = torch.randn(1, 576).to(torch.bfloat16)


@pytest.fixture
def problem(seed):
    q, cache, table, sl = make_problem(SEQLENS, S_Q, H_Q)
    meta, ns = RM.get_mla_metadata(sl, PARTS)
    assert meta[:, :6].tolist() == [[0, 0, 0, 4, 0, 1], [0, 4, 0, 5, 1, 1], [1, 0, 1, 1, 2, 1],
                                    [2, 0, 2, 2, 3, 1], [3, 0, 3, 0, 4, 0], [3, 0, 3, 0, 4, 0]]
    assert ns.tolist() == [0, 2, 3, 4]
    return dict(q=q, cache=cache, table=table, sl=sl, meta=meta, ns=ns)


def _with(p, **changes):
    """The problem with copies of some tensors changed in place by changes[name](tensor)."""
    p = dict(p)
    for name, change in changes.items():
        p[name] = p[name].clone()
        change(p[name])
    return p


def _set(index, value):
    def change(t):
        t[index] = value
    return change


MAX_TOKENS = (max(-(-L // PAGE) for L in SEQLENS) + 1) * PAGE      # make_problem's table: 6 columns
NUM_BLOCKS = sum(-(-L // PAGE) for L in SEQLENS) + 3               # and its pages (3 spare)

# name, changes, (code, args recorded, CTA x or None): the CTAs that find a case record the
# same arguments, so they do not depend on the order the CTAs run in; the CTA is given where
# exactly one finds it (a row's checks also read the previous row's last sequence).
DEVICE_CASES = [
    ("stale: sequence 0 grew", dict(sl=lambda t: t.__setitem__(0, 301)),
     ("MetadataStale", (301, 300, 0), None)),
    ("page id past the cache", dict(table=_set((2, 1), NUM_BLOCKS + 7)),
     ("BlockTableOutOfRange", (NUM_BLOCKS + 7, NUM_BLOCKS, 2), 3)),
    ("negative page id", dict(table=_set((0, 4), -5)),
     ("BlockTableOutOfRange", (-5, NUM_BLOCKS, 0), 1)),
    ("seqlen past the block table", dict(sl=_set(1, MAX_TOKENS + 1)),
     ("SeqlenOutOfRange", (MAX_TOKENS + 1, MAX_TOKENS, 1), None)),
    ("negative seqlen", dict(sl=_set(1, -3)),
     ("SeqlenOutOfRange", (-3, MAX_TOKENS, 1), None)),
    ("seqlen 2^31 - 1", dict(sl=_set(2, 2**31 - 1)),
     ("SeqlenOutOfRange", (2**31 - 1, MAX_TOKENS, 2), None)),
    ("batch index past b", dict(meta=_set((2, 0), 8)),
     ("MetadataOutOfRange", (8, 3, 8 * 2 + 0), 2)),
    ("first_block does not continue row 0", dict(meta=_set((1, 1), 3)),
     ("MetadataMismatch", (3, 4, 8 * 1 + 1), 1)),
    ("num_splits not the metadata's numbering", dict(ns=_set(1, 3)),
     ("NumSplitsMismatch", (3, 2, 1), None)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,changes,expected", DEVICE_CASES, ids=[c[0] for c in DEVICE_CASES])
def test_device_check_records_and_raises(backend, name, changes, expected, problem):
    # The kernel records the error (code, arguments, CTA), skips the bad CTA's work without
    # an out-of-bounds access (the emulator faults on any access outside the tensors; the
    # interpreter crashed on a page past the cache before), and the CPU backends raise it
    # at once, clearing the record.
    code_name, args, cta_x = expected
    p = _with(problem, **changes)
    with pytest.raises(KernelInputError) as info:
        _decode(backend, p["q"], p["cache"], p["table"], p["sl"], p["meta"], p["ns"])
    err = info.value
    assert err.code == CODE[code_name] and err.args_recorded == args, str(err)
    assert err.argument == device_errors.CODES[err.code].argument and str(err).startswith(
        f"flash_mla_with_kvcache: {err.argument}: ")
    if cta_x is not None:
        assert err.cta[0] == cta_x, str(err)
    assert device_errors.record_for(torch.device("cpu"), CM.OP_NAME).eq(0).all(), "record not cleared"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_good_call_after_an_error_runs_normally(backend, problem):
    p = problem
    with pytest.raises(KernelInputError):
        _decode(backend, p["q"], p["cache"], p["table"], p["sl"], _with(p, meta=_set((2, 0), 8))["meta"], p["ns"])
    out, lse = _decode(backend, p["q"], p["cache"], p["table"], p["sl"], p["meta"], p["ns"])
    _assert_matches_reference(out, lse, p["q"], p["cache"], p["table"], p["sl"])


def test_device_messages_name_the_argument(problem):
    p = _with(problem, sl=lambda t: t.__setitem__(0, 301))
    with pytest.raises(KernelInputError, match=r"flash_mla_with_kvcache: tile_scheduler_metadata: was made for "
                                               r"other cache_seqlens \(batch 0: made for 300 tokens, called with "
                                               r"301\); call get_mla_metadata again"):
        _decode("triton", p["q"], p["cache"], p["table"], p["sl"], p["meta"], p["ns"])
    p = _with(problem, table=_set((2, 1), NUM_BLOCKS + 7))
    with pytest.raises(KernelInputError, match=rf"block_table: expected page ids in \[0, {NUM_BLOCKS}\) .* got "
                                               rf"{NUM_BLOCKS + 7} \(batch 2\) \[found by the kernel, "
                                               r"CTA \(3, 0, 0\)\]"):
        _decode("emu", p["q"], p["cache"], p["table"], p["sl"], p["meta"], p["ns"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_pages_in_use_are_checked(backend, problem):
    # Table entries past each sequence's blocks are not read: garbage there is no error.
    p = _with(problem, table=lambda t: (t[1, 1:].fill_(10**6), t[2, 2:].fill_(-7)))
    out, lse = _decode(backend, p["q"], p["cache"], p["table"], p["sl"], p["meta"], p["ns"])
    _assert_matches_reference(out, lse, p["q"], p["cache"], p["table"], p["sl"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_metadata_reused_after_the_sequences_grew_raises(backend, seed):
    # A decode step: schedule, attend; the next step appends s_q tokens to every sequence
    # (sequence 2 crosses into a new page) but reuses the old schedule. Without the check
    # this answered wrong with no error; now the kernel raises, and the fresh schedule
    # gives the reference's answer.
    s_q = 2
    q, cache, table, sl = make_problem([300, 2, 127], s_q, H_Q)
    meta, ns = RM.get_mla_metadata(sl, PARTS)
    grown = sl + s_q
    for i in range(len(sl)):
        _extend(cache, table, sl, i, int(grown[i]))
    with pytest.raises(KernelInputError, match="tile_scheduler_metadata: was made for other cache_seqlens"):
        _decode(backend, q, cache, table, grown, meta, ns)
    with pytest.raises(ValueError, match=r"tile_scheduler_metadata: row 0 was made for other cache_seqlens "
                                         r"\(batch 0: made for 300 tokens, called with 302\)"):
        check_schedule(meta, ns, grown)
    meta2, ns2 = (TM if backend == "triton" else RM).get_mla_metadata(grown, PARTS)
    out, lse = _decode(backend, q, cache, table, grown, meta2, ns2)
    _assert_matches_reference(out, lse, q, cache, table, grown)


def test_a_whole_sequence_inside_a_row_is_read_to_its_current_length(seed):
    # Only the first and last sequence of a row have block ranges fixed by the metadata
    # (first_seqlen / last_seqlen); a sequence strictly inside a row is read up to the length
    # the call passes, so a change there is not stale: the answer is still the reference's.
    q, cache, table, sl = make_problem([100, 50, 60], 1, H_Q)
    meta, ns = RM.get_mla_metadata(sl, 1)
    assert meta[0, :6].tolist() == [0, 0, 2, 1, 0, 3]          # one row: the three whole sequences
    changed = sl.clone()
    changed[1] = 120                                              # two pages: the table has room
    _extend(cache, table, sl, 1, 120)
    check_schedule(meta, ns, changed)
    out, lse = _decode("triton", q, cache, table, changed, meta, ns)
    _assert_matches_reference(out, lse, q, cache, table, changed)


def test_combine_reads_no_scratch_row_past_its_end(seed):
    # The combine kernel alone, given num_splits whose split ids run past the scratch (which
    # the decode kernel reports first): it reads no row outside [0, b + num_sm_parts) (the
    # emulator faults on any access outside the tensors) and leaves such sequences unwritten.
    b, rows, parts = 2, 16, 3
    oacc = torch.zeros(b + parts, rows, 512)
    lacc = torch.zeros(b + parts, rows)
    out, lse = poisoned(b, 1, rows)
    ns = torch.tensor([0, 2, 9], dtype=torch.int32)               # sequence 1: splits 2..8 of 5 rows
    CM.run_plan(CM.combine_plan(ns, oacc, lacc, out, lse, h_q=rows), "emu")
    assert (out[0] == 0).all() and out[1].isnan().all() and lse[1].isnan().all()
    ns = torch.tensor([-4, 2, 3], dtype=torch.int32)              # sequence 0 from split -4
    out, lse = poisoned(b, 1, rows)
    CM.run_plan(CM.combine_plan(ns, oacc, lacc, out, lse, h_q=rows), "emu")
    assert out[0].isnan().all()


# ------------------------------------------------------------------------ check_schedule

def test_check_schedule_accepts_every_schedule_of_both_schedulers(seed):
    g = random.Random(seed)
    for _ in range(40):
        b, parts = g.randint(0, 9), g.randint(1, 12)
        sl = torch.tensor([g.choice([0, 1, 63, 64, 65, g.randint(0, 3000)]) for _ in range(b)], dtype=torch.int32)
        for builder in (RM, TM):
            meta, ns = builder.get_mla_metadata(sl, parts)
            check_schedule(meta, ns, sl)


@pytest.mark.parametrize("change,argument,message", [
    (dict(sl=lambda t: t.add_(1)), "tile_scheduler_metadata",
     r"row 0 was made for other cache_seqlens \(batch 0: made for 300 tokens, called with 301\); call "
     r"get_mla_metadata again after the sequences change"),
    (dict(meta=_set((2, 0), 8)), "tile_scheduler_metadata",
     r"row 2, first_batch \(column 0\): expected a batch index in \[0, 3\), got 8"),
    (dict(meta=_set((3, 3), 5)), "tile_scheduler_metadata",
     r"row 3, last_block_end \(column 3\): expected a block index in \[0, 2\] \(batch 2 has 2 blocks of 64\), "
     r"got 5"),
    (dict(meta=_set((1, 5), 4)), "tile_scheduler_metadata",
     r"row 1, num_pieces \(column 5\): expected a piece count in \[0, 3\] \(b = 3\), got 4"),
    (dict(meta=_set((3, 4), 9)), "tile_scheduler_metadata",
     r"row 3, first_split \(column 4\): expected a split id in \[0, 8\] \(at most b \+ num_sm_parts = 9 splits\)"
     r", got 9"),
    (dict(meta=_set((1, 1), 3)), "tile_scheduler_metadata",
     r"row 1, first_block \(column 1\): expected 4 \(where row 0 ended\), got 3"),
    (dict(meta=_set((0, 4), 1)), "tile_scheduler_metadata",
     r"row 0, first_split \(column 4\): expected 0 \(row 0 starts at batch 0, block 0, split 0\), got 1"),
    (dict(meta=lambda t: t[3].copy_(t[4])), "tile_scheduler_metadata",
     r"row 3, first_batch \(column 0\): expected 2 \(where row 2 ended\), got 3"),
    (dict(meta=lambda t: t[3:].copy_(torch.tensor([2, 0, 2, 0, 3, 0, 0, 0]))), "tile_scheduler_metadata",
     r"expected the rows to end after the last block of batch 2 \(block 2\), got rows ending at batch 2, "
     r"block 0: the rest of the sequences is in no row"),
    (dict(ns=_set(1, 3)), "num_splits",
     r"expected num_splits\[1\] = 2 \(one past the split id of batch 0's last piece, row 1 of "
     r"tile_scheduler_metadata\), got 3"),
    (dict(ns=_set(3, 5)), "num_splits",
     r"expected num_splits\[3\] = 4 \(the number of splits in tile_scheduler_metadata\), got 5"),
    (dict(sl=_set(2, -1)), "cache_seqlens", r"expected values >= 0, got -1 \(batch 2\)"),
])
def test_check_schedule_errors(change, argument, message, problem):
    p = _with(problem, **change)
    with pytest.raises(ValueError, match=f"^{argument}: {message}"):
        check_schedule(p["meta"], p["ns"], p["sl"])


def test_check_schedule_argument_types_and_shapes(problem):
    meta, ns, sl = problem["meta"], problem["ns"], problem["sl"]
    with pytest.raises(TypeError, match="tile_scheduler_metadata: expected dtype int32, got int64"):
        check_schedule(meta.long(), ns, sl)
    with pytest.raises(ValueError, match=r"tile_scheduler_metadata: expected shape \[num_sm_parts >= 1, 8\], "
                                         r"got \[0, 8\]"):
        check_schedule(meta[:0], ns, sl)
    with pytest.raises(ValueError, match=r"num_splits: expected shape \[4\] \(b \+ 1 for cache_seqlens of shape "
                                         r"\[3\]\), got \[3\]"):
        check_schedule(meta, ns[:3], sl)
    with pytest.raises(TypeError, match="cache_seqlens: expected a torch.Tensor, got list"):
        check_schedule(meta, ns, [300, 2, 70])


@triton.jit
def _check_every_partition(meta_ptr, seqlens_ptr, nsplits_ptr, bt_ptr, stride_bt, P, B, NUM_BLOCKS, MAX_BLOCKS,
                           res_ptr, PAGE: tl.constexpr, CHK: tl.constexpr, E_TABLE: tl.constexpr,
                           E_LEN: tl.constexpr, E_STALE: tl.constexpr, E_RANGE: tl.constexpr,
                           E_SPLITS: tl.constexpr, E_MISMATCH: tl.constexpr):
    # The decode kernel's checks alone (the same jit function), one program per partition.
    part = tl.program_id(0)
    row = meta_ptr + part * 8
    c, a0, a1, a2 = _check_partition(tl.load(row + 0), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3),
                                     tl.load(row + 4), tl.load(row + 5), tl.load(row + 6), tl.load(row + 7),
                                     part, meta_ptr, seqlens_ptr, nsplits_ptr, bt_ptr, stride_bt, P, B,
                                     NUM_BLOCKS, MAX_BLOCKS, PAGE, CHK, E_TABLE, E_LEN, E_STALE, E_RANGE,
                                     E_SPLITS, E_MISMATCH)
    tl.store(res_ptr + part * 4 + 0, c)
    tl.store(res_ptr + part * 4 + 1, a0)
    tl.store(res_ptr + part * 4 + 2, a1)
    tl.store(res_ptr + part * 4 + 3, a2)


def _device_verdicts(meta, ns, sl, table, num_blocks):
    res = torch.full((meta.shape[0], 4), -99, dtype=torch.int32)
    _check_every_partition[(meta.shape[0],)](
        meta, sl, ns, table, table.stride(0), meta.shape[0], sl.shape[0], num_blocks, table.shape[1], res,
        PAGE=PAGE, CHK=TM._PAGE_CHECK, E_TABLE=TM.ERR_BLOCK_TABLE, E_LEN=TM.ERR_SEQLEN, E_STALE=TM.ERR_STALE,
        E_RANGE=TM.ERR_META_RANGE, E_SPLITS=TM.ERR_NUM_SPLITS, E_MISMATCH=TM.ERR_META_MISMATCH)
    assert (res[:, 0] != -99).all()
    return res


def _mutate(g, meta, ns, sl, max_tokens):
    """One random corruption of a valid schedule or of the seqlens (within the table)."""
    meta, ns, sl = meta.clone(), ns.clone(), sl.clone()
    kind = g.randrange(5)
    if kind == 0:
        meta[g.randrange(meta.shape[0]), g.randrange(8)] += g.choice([-2, -1, 1, 2])
    elif kind == 1:
        meta[g.randrange(meta.shape[0]), g.randrange(8)] = g.randint(-3, sl.shape[0] + 3)
    elif kind == 2 and meta.shape[0] > 1:
        i, j = g.sample(range(meta.shape[0]), 2)
        meta[[i, j]] = meta[[j, i]]
    elif kind == 3:
        ns[g.randrange(ns.shape[0])] += g.choice([-1, 1])
    elif sl.shape[0]:
        i = g.randrange(sl.shape[0])
        sl[i] = g.choice([min(int(sl[i]) + g.choice([-65, -1, 1, 64]), max_tokens), -1, 0, max_tokens])
    return meta, ns, sl


def test_kernel_checks_agree_with_check_schedule(seed):
    # For valid schedules and random corruptions of them (entries, row order, num_splits,
    # seqlens), the decode kernel's checks find an error in some partition exactly when
    # check_schedule raises. The block table is valid everywhere (page ids are the kernels'
    # own check; the host contract does not see the table), and seqlens stay within it.
    g = random.Random(seed)
    trials = 0
    while trials < 60:
        b, parts = g.randint(1, 5), g.randint(1, 7)
        sl = torch.tensor([g.choice([0, 1, 64, 65, g.randint(0, 400)]) for _ in range(b)], dtype=torch.int32)
        max_blocks = 8
        num_blocks = 11
        table = torch.randint(0, num_blocks, (b, max_blocks), dtype=torch.int32)
        meta, ns = RM.get_mla_metadata(sl, parts)
        cases = [(meta, ns, sl)] + [_mutate(g, meta, ns, sl, max_blocks * PAGE) for _ in range(3)]
        for m, n, s in cases:
            try:
                check_schedule(m, n, s)
                host_error = None
            except ValueError as e:
                host_error = str(e)
            res = _device_verdicts(m, n, s, table, num_blocks)
            bad = res[res[:, 0] != 0]
            assert (len(bad) > 0) == (host_error is not None), (m.tolist(), n.tolist(), s.tolist(), host_error,
                                                                res.tolist())
            assert not (bad[:, 0] == TM.ERR_BLOCK_TABLE).any()
            trials += 1


# ------------------------------------------------------------------------ scheduler limits

def test_scheduler_at_the_int32_limit():
    # 2^31 - 1 tokens: 2^25 blocks, and with 70 such sequences a total cost past 2^31 (int64
    # in the Triton scheduler); both schedulers agree and the schedule is valid.
    for seqlens, parts in (([2**31 - 1, 5], 8), ([2**31 - 1] * 70, 132), ([2**31 - 1, 0, 2**31 - 64], 3)):
        sl = torch.tensor(seqlens, dtype=torch.int32)
        meta, ns = TM.get_mla_metadata(sl, parts)
        r_meta, r_ns = RM.get_mla_metadata(sl, parts)
        assert torch.equal(meta, r_meta) and torch.equal(ns, r_ns)
        check_schedule(meta, ns, sl)
        assert int(ns[-1]) <= len(seqlens) + parts - 1           # the split scratch's bound
        assert (meta[:, 3] <= 2**25).all() and meta[0, 6] == seqlens[0]


@pytest.mark.parametrize("builder", [RM, TM], ids=["reference", "triton"])
def test_scheduler_input_errors(builder):
    with pytest.raises(ValueError, match=r"cache_seqlens: expected values in \[0, 2147483647\], got -1 \(batch 1\)"):
        builder.get_mla_metadata(torch.tensor([5, -1], dtype=torch.int32), 4)
    for parts in (0, -3):
        with pytest.raises(ValueError, match=f"num_sm_parts: expected an int >= 1, got {parts}"):
            builder.get_mla_metadata(torch.tensor([5], dtype=torch.int32), parts)
    with pytest.raises(ValueError, match=r"cache_seqlens: expected values in \[0, 2147483647\], got 2147483648"):
        RM.schedule([2**31], 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_metadata_without_rows(backend, problem):
    p = problem
    with pytest.raises(ValueError, match=r"tile_scheduler_metadata: expected at least one row, got shape \[0, 8\]"):
        _decode(backend, p["q"], p["cache"], p["table"], p["sl"], p["meta"][:0], p["ns"])


# ------------------------------------------------------------------------ MlaSchedule

def _counting_builder():
    calls = []

    def build(seqlens, parts):
        calls.append(seqlens.clone())
        return RM.get_mla_metadata(seqlens, parts)
    return build, calls


def test_mla_schedule_builds_once_per_step_and_on_change(seed):
    sl = torch.randint(0, 500, (5,), dtype=torch.int32)
    build, calls = _counting_builder()
    sched = MlaSchedule()
    first = sched.resolve(sl, 32, 1, 4, build)
    assert sched.resolve(sl, 32, 1, 4, build) is first and len(calls) == 1      # every layer of the step
    check_schedule(*first, sl)
    sl.add_(1)                                                                   # the next step, in place
    second = sched.resolve(sl, 32, 1, 4, build)
    assert len(calls) == 2 and torch.equal(calls[-1], sl)
    check_schedule(*second, sl)
    with pytest.raises(ValueError, match="was made for other cache_seqlens"):
        check_schedule(*first, sl)
    sl[2] = 7                                                                    # one sequence changed
    check_schedule(*sched.resolve(sl, 32, 1, 4, build), sl)
    assert len(calls) == 3
    sched.resolve(sl.clone(), 32, 1, 4, build)                                  # same values (CPU: by value)
    assert len(calls) == 3
    sched.resolve(sl, 32, 1, 5, build)                                          # other partition count
    sched.resolve(sl, 64, 1, 5, build)                                          # other query rows
    assert len(calls) == 5


def test_mla_schedule_on_device_tensors_keys_on_the_version_counter():
    # Off the CPU the seqlens are not read: the key is the tensor's address, shape and
    # version counter (meta tensors stand in for GPU ones here). Inference tensors have no
    # version counter: rebuilt on every call.
    sl = torch.zeros(4, dtype=torch.int32, device="meta")
    built = []

    def build(seqlens, parts):
        built.append(seqlens._version if not seqlens.is_inference() else None)
        return seqlens.new_empty(parts, 8), seqlens.new_empty(5)
    sched = MlaSchedule()
    a = sched.resolve(sl, 16, 1, 2, build)
    assert sched.resolve(sl, 16, 1, 2, build) is a and len(built) == 1
    sl.add_(1)
    assert sched.resolve(sl, 16, 1, 2, build) is not a and len(built) == 2
    sl[1:].fill_(3)                                                             # a write through a view
    sched.resolve(sl, 16, 1, 2, build)
    assert len(built) == 3
    with torch.inference_mode():
        inf = torch.zeros(4, dtype=torch.int32, device="meta")
    sched.resolve(inf, 16, 1, 2, build)
    sched.resolve(inf, 16, 1, 2, build)
    assert len(built) == 5 and sched.builds == 5


# ------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_records_without_a_host_read(backend, problem):
    # On a GPU the call does not read the record (no synchronisation): the error surfaces at
    # check_errors(), cleared there; a good call afterwards is the reference's answer.
    dev = torch.device("cuda")
    def decode_on_gpu(p):
        g = {k: v.to(dev) for k, v in p.items()}
        return _decode(backend, g["q"], g["cache"], g["table"], g["sl"], g["meta"], g["ns"])

    for p, expect in ((_with(problem, sl=_set(0, 301)), "MetadataStale"),
                      (_with(problem, table=_set((2, 1), NUM_BLOCKS + 7)), "BlockTableOutOfRange")):
        decode_on_gpu(p)
        torch.cuda.synchronize()
        with pytest.raises(KernelInputError) as info:
            device_errors.check_errors(dev)
        assert info.value.code == CODE[expect], str(info.value)
        device_errors.check_errors(dev)                       # cleared
    out, lse = decode_on_gpu(problem)
    device_errors.check_errors(dev)
    _assert_matches_reference(out.cpu(), lse.cpu(), problem["q"], problem["cache"], problem["table"], problem["sl"])
