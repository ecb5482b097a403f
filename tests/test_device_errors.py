"""The device error record contract (pykernels/runtime/device_errors.py and
csrc/include/pk/error_record.cuh): the Python code table and the CUDA enum agree, the
record's layout is the same on both sides, and the host side (record_for, raise_if_set,
check_errors, record_first, KernelInputError) reports a recorded error once, clearly."""
import re
import string
from pathlib import Path

import pytest
import torch

from pykernels.runtime import device_errors as D

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "include" / "pk" / "error_record.cuh"


def _header_enum() -> dict:
    """name -> value of the enumerators of `enum ErrorCode` in error_record.cuh."""
    text = HEADER.read_text()
    body = re.search(r"enum\s+ErrorCode\s*:\s*int\s*\{(.*?)\};", text, re.S)
    assert body, "enum ErrorCode not found in error_record.cuh"
    entries = re.findall(r"\bkErr(\w+)\s*=\s*(\d+)\s*,", re.sub(r"//[^\n]*", "", body.group(1)))
    assert entries, "no enumerators parsed"
    return {name: int(value) for name, value in entries}


def test_code_table_matches_the_cuda_enum():
    enum = _header_enum()
    assert enum.pop("None") == 0
    assert enum == {spec.name: number for number, spec in D.CODES.items()}
    assert len(set(enum.values())) == len(enum)                 # no number used twice


def test_record_layout_matches_the_cuda_header():
    text = HEADER.read_text()
    assert int(re.search(r"kErrorRecordWords\s*=\s*(\d+);", text).group(1)) == D.RECORD_WORDS
    # the words record_error writes: code at 0 (atomicCAS), arguments at 1-3, CTA at 4-6
    writes = dict(re.findall(r"record\[(\d)\]\s*=\s*([^;]+);", text))
    assert writes == {"1": "a0", "2": "a1", "3": "a2", "4": "static_cast<int>(blockIdx.x)",
                      "5": "static_cast<int>(blockIdx.y)", "6": "static_cast<int>(blockIdx.z)"}
    assert "atomicCAS(record, 0, code)" in text


@pytest.mark.parametrize("number", sorted(D.CODES))
def test_every_template_formats_with_the_three_arguments(number):
    spec = D.CODES[number]
    fields = {f for _, f, _, _ in string.Formatter().parse(spec.template) if f}
    assert fields <= {"a0", "a1", "a2"}, spec.template
    e = D.KernelInputError("some_op", number, (11, 22, 33), (1, 2, 3))
    assert str(e).startswith(f"some_op: {spec.argument}: ")
    assert str(e).endswith("[found by the kernel, CTA (1, 2, 3)]")
    for f in fields:
        assert str({"a0": 11, "a1": 22, "a2": 33}[f]) in str(e)
    assert (e.op, e.code, e.argument, e.args_recorded, e.cta) == ("some_op", number, spec.argument,
                                                                 (11, 22, 33), (1, 2, 3))
    assert isinstance(e, ValueError)


def test_code_by_name():
    for number, spec in D.CODES.items():
        assert D.code(spec.name) == number
    with pytest.raises(KeyError, match="name: expected one of .*MIndexOutOfRange.*, got 'NoSuchCode'"):
        D.code("NoSuchCode")


def test_messages_of_the_gemm_codes():
    e = D.KernelInputError("m_grouped_fp8_gemm_nt_contiguous", D.code("MIndexOutOfRange"), (7, 4, 130), (3, 0, 0))
    assert str(e) == ("m_grouped_fp8_gemm_nt_contiguous: m_indices: expected values in [-1, 4) (-1 marks "
                      "padding rows), got 7 at row 130 [found by the kernel, CTA (3, 0, 0)]")
    e = D.KernelInputError("m_grouped_fp8_gemm_nt_masked", D.code("MaskedMOutOfRange"), (-2, 64, 1), (0, 0, 0))
    assert str(e) == ("m_grouped_fp8_gemm_nt_masked: masked_m: expected values in [0, 64] (a's rows per "
                      "group), got -2 for group 1 [found by the kernel, CTA (0, 0, 0)]")
    e = D.KernelInputError("op", 999, (1, 2, 3), (4, 5, 6))
    assert str(e) == "op: the kernel recorded unknown error code 999 (args (1, 2, 3), CTA (4, 5, 6))"
    assert e.argument is None


def _fresh_record(op):
    record = D.record_for(torch.device("cpu"), op)
    record.zero_()
    return record


def test_record_for_is_one_record_per_device_and_names_the_last_op():
    r1 = D.record_for("cpu", "first_op")
    r2 = D.record_for(torch.device("cpu"), "second_op")
    assert r1 is r2 and r1.dtype == torch.int32 and r1.shape == (D.RECORD_WORDS,)
    r1.zero_()
    r1[:7] = torch.tensor([D.code("MaskedMOutOfRange"), 9, 8, 2, 0, 0, 0], dtype=torch.int32)
    with pytest.raises(D.KernelInputError, match=r"^second_op: masked_m: .*got 9 for group 2"):
        D.check_errors("cpu")                       # raised under the op that used the record last


def test_raise_if_set_raises_once_and_clears():
    record = _fresh_record("gemm")
    D.raise_if_set(record, "gemm")                  # nothing recorded: no error
    record[:7] = torch.tensor([D.code("MIndexOutOfRange"), -3, 2, 5, 1, 0, 0], dtype=torch.int32)
    with pytest.raises(D.KernelInputError) as info:
        D.raise_if_set(record, "gemm")
    assert info.value.argument == "m_indices" and info.value.args_recorded == (-3, 2, 5)
    assert info.value.cta == (1, 0, 0)
    assert torch.count_nonzero(record) == 0         # cleared: the next call starts clean
    D.raise_if_set(record, "gemm")
    D.check_errors()                                # every device's record: all clean


def test_record_first_keeps_the_first_error_and_needs_no_host_read():
    record = _fresh_record("op")
    values = torch.tensor([0, 3, -1, 9, -4], dtype=torch.int32)
    D.record_first(record, D.code("MIndexOutOfRange"), values < -1, values, 3)     # row 4 only
    D.record_first(record, D.code("MIndexOutOfRange"), values >= 3, values, 3)     # rows 1, 3: too late
    assert record.tolist() == [D.code("MIndexOutOfRange"), -4, 3, 4, -1, -1, -1, 0]   # CTA words: NO_KERNEL
    with pytest.raises(D.KernelInputError, match=r"\[found on the device by torch ops, not a kernel\]$") as info:
        D.raise_if_set(record, "op")
    assert info.value.cta == D.NO_KERNEL
    D.record_first(record, D.code("MIndexOutOfRange"), values >= 3, values, 3)     # the first bad one
    assert record.tolist()[:4] == [D.code("MIndexOutOfRange"), 3, 3, 1]
    record.zero_()
    D.record_first(record, 1, values > 100, values, 3)                             # nothing bad
    D.record_first(record, 1, values[:0] > 0, values[:0], 3)                       # empty
    assert torch.count_nonzero(record) == 0
    # meta tensors have no data: any host read (.item(), bool(), .tolist()) would raise
    meta = torch.zeros(D.RECORD_WORDS, dtype=torch.int32, device="meta")
    D.record_first(meta, 1, torch.zeros(5, dtype=torch.bool, device="meta"),
                   torch.zeros(5, dtype=torch.int32, device="meta"), 3)


def test_a_device_without_index_is_the_current_cuda_device(monkeypatch):
    # check_errors("cuda") must read the record that kernels on cuda:N (N current) wrote
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert D.device_key("cuda") == torch.device("cuda", 3)
    assert D.device_key(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert D.device_key("cpu") == torch.device("cpu")
