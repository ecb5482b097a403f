"""Tests for pykernels.emu.hopper.layouts.

Two kinds of checks:
* hand-derived cases from the PTX ISA figures plus structural properties
  (bijectivity, involution, footprint), which run everywhere;
* a CuTe oracle (tests/emu/cute_oracle.cpp) compiled with the host g++ against
  the CUTLASS headers shipped in the ``nvidia-cutlass`` pip package; it prints
  CuTe's SM90 GMMA layouts and the tests compare them element by element.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from pykernels.emu.hopper import layouts as L

ALL_N = list(range(8, 257, 8))
MODES = ["none", "32B", "64B", "128B"]


# ---------------------------------------------------------------------------
# Hand-checked cases and structural properties
# ---------------------------------------------------------------------------

def test_d_coords_hand_cases():
    rows, cols = L.wgmma_d_coords(256)
    assert rows.shape == cols.shape == (128, 128)
    # thread 0: d0,d1 -> row 0 cols 0,1; d2,d3 -> row 8; d4 -> next 8-col block
    assert [(rows[0, i], cols[0, i]) for i in range(5)] == [(0, 0), (0, 1), (8, 0), (8, 1), (0, 8)]
    assert (rows[5, 0], cols[5, 0]) == (1, 2)          # lane 5: group 1, quad position 1
    assert (rows[37, 0], cols[37, 0]) == (17, 2)       # warp 1 starts at row 16
    assert (rows[127, 0], cols[127, 0]) == (55, 6)
    assert (rows[127, 127], cols[127, 127]) == (63, 255)


@pytest.mark.parametrize("n", ALL_N)
def test_d_coords_bijective(n):
    rows, cols = L.wgmma_d_coords(n)
    assert rows.shape == (128, n // 2)
    grid = np.zeros((64, n), dtype=np.int64)
    np.add.at(grid, (rows, cols), 1)
    assert (grid == 1).all()


def test_d_coords_rejects_bad_n():
    for n in (0, 4, 12, 264):
        with pytest.raises(ValueError):
            L.wgmma_d_coords(n)


def test_d_coords_f16_packing():
    rows, cols = L.wgmma_d_coords_f16(64)
    assert rows.shape == (128, 16, 2)
    # the two halves of one register are column-adjacent elements of one row
    assert (rows[..., 0] == rows[..., 1]).all()
    assert (cols[..., 1] == cols[..., 0] + 1).all()
    assert (cols[..., 0] % 2 == 0).all()


def test_a_reg_coords_16bit():
    rows, cols = L.wgmma_a_reg_coords(16)
    assert rows.shape == (128, 8)
    expect_t0 = [(0, 0), (0, 1), (8, 0), (8, 1), (0, 8), (0, 9), (8, 8), (8, 9)]
    assert [(rows[0, e], cols[0, e]) for e in range(8)] == expect_t0
    assert (rows[1, 0], cols[1, 0]) == (0, 2)
    assert (rows[4, 0], cols[4, 0]) == (1, 0)
    assert (rows[32, 0], cols[32, 0]) == (16, 0)
    grid = np.zeros((64, 16), dtype=np.int64)
    np.add.at(grid, (rows, cols), 1)
    assert (grid == 1).all()


def test_a_reg_coords_8bit():
    rows, cols = L.wgmma_a_reg_coords(8)
    assert rows.shape == (128, 16)
    assert [(rows[1, e], cols[1, e]) for e in range(4)] == [(0, 4), (0, 5), (0, 6), (0, 7)]
    assert (rows[1, 4], cols[1, 4]) == (8, 4)     # a1: row g+8
    assert (rows[1, 8], cols[1, 8]) == (0, 20)    # a2: row g, K + 16
    assert (rows[1, 12], cols[1, 12]) == (8, 20)  # a3: row g+8, K + 16
    grid = np.zeros((64, 32), dtype=np.int64)
    np.add.at(grid, (rows, cols), 1)
    assert (grid == 1).all()


def test_desc_encode_hand_case():
    d = L.encode_desc(0x400, 16, 1024, 0, "128B")
    assert d == 0x40 | (1 << 16) | (64 << 32) | (1 << 62)
    f = L.decode_desc(d)
    assert f["start_address"] == 0x400 and f["leading_byte_offset"] == 16
    assert f["stride_byte_offset"] == 1024 and f["swizzle"] == "128B" and f["base_offset"] == 0
    assert L.decode_desc(3 << 62)["swizzle"] == "32B"
    assert L.decode_desc(2 << 62)["swizzle"] == "64B"
    assert L.decode_desc(5 << 49)["base_offset"] == 5


def test_desc_roundtrip_random():
    rng = np.random.default_rng(0)
    mask = L.encode_desc((1 << 18) - 16, (1 << 18) - 16, (1 << 18) - 16, 7, 3)
    for d in rng.integers(0, 1 << 63, size=200, dtype=np.int64):
        d = int(d) | (int(rng.integers(0, 2)) << 63)
        d &= mask
        assert L.encode_desc(**L.decode_desc(d)) == d
    with pytest.raises(ValueError):
        L.encode_desc(8, 0, 0)


def test_swizzle_hand_cases():
    s = L.swizzle
    assert s(128, "128B") == 144            # row 1, chunk 0 -> chunk 1
    assert s(0x3F0, "128B") == 0x380        # row 7, chunk 7 -> chunk 0
    assert s(1024 + 16, "128B") == 1040     # pattern repeats every 1024 B
    assert s(512, "128B") == 576 and s(512, "64B") == 512
    assert s(128, "64B") == 144 and s(384, "64B") == 384 + 48
    assert s(128, "32B") == 144 and s(256, "32B") == 256
    assert s(12345, "none") == 12345
    a = np.arange(1 << 14)
    for m in MODES:
        out = L.swizzle(a, m)
        assert (L.swizzle(out, m) == a).all()            # involution
        assert (np.sort(out) == a).all()                  # permutation
        b = L.SWIZZLE_MODES[m]
        assert (out >> (4 + b) == a >> (4 + b)).all() and (out & 15 == a & 15).all()  # only chunk bits move


def test_operand_offsets_hand_cases():
    # K-major, no swizzle, bf16: core matrix = 8 rows x 8 elems (16 B)
    off = L.operand_byte_offsets(L.encode_desc(0, 128, 256, 0, "none"), 64, 16, 2, "K")
    assert off[0, 0] == 0 and off[1, 0] == 16 and off[0, 1] == 2
    assert off[0, 8] == 128 and off[8, 0] == 256 and off[9, 9] == 256 + 16 + 128 + 2
    # K-major 128B swizzle, bf16: row 1 of the atom starts at 128, chunk 0 -> 1
    off = L.operand_byte_offsets(L.encode_desc(0, 16, 1024, 0, "128B"), 64, 16, 2, "K")
    assert off[1, 0] == 144 and off[7, 0] == 7 * 128 + 7 * 16 and off[8, 0] == 1024
    # start + 32 B (second K step inside the atom) swizzles with the absolute address
    off2 = L.operand_byte_offsets(L.encode_desc(32, 16, 1024, 0, "128B"), 64, 16, 2, "K")
    assert off2[1, 0] == 128 + ((2 ^ 1) * 16)
    # MN-major 128B, bf16: 64 contiguous MN elements per 128-byte row, K rows
    off = L.operand_byte_offsets(L.encode_desc(0, 8192, 1024, 0, "128B"), 128, 16, 2, "MN")
    assert off[1, 0] == 2 and off[0, 1] == 144 and off[64, 0] == 8192 and off[0, 8] == 1024
    with pytest.raises(ValueError):  # K wider than a 32B atom with LBO unused
        L.operand_byte_offsets(L.encode_desc(0, 0, 256, 0, "32B"), 64, 32, 2, "K")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("eb", [1, 2, 4])
@pytest.mark.parametrize("major", ["K", "MN"])
def test_operand_offsets_distinct_and_footprint(mode, eb, major):
    atom = L.swizzle_atom_bytes(mode)
    start = 2048
    if major == "K":
        rows, k = 64, 32 // eb
        lbo = 128 if mode == "none" else 16      # unused when swizzled
        sbo = 8 * atom if mode != "none" else 256
        footprint = (rows // 8) * sbo  # 8-row groups; swizzled atoms may be wider than 32 B of K
    else:
        rows, k = 256 // eb, 32 // eb
        if mode == "none":
            # core matrices (8 K-rows x 16 B) packed MN-first, then the next 8 K-rows
            lbo, sbo = (rows * eb // 16) * 128, 128
        else:
            lbo, sbo = 8 * atom, 8 * atom * (rows * eb // atom)
        footprint = rows * eb * k
    off = L.operand_byte_offsets(L.encode_desc(start, lbo, sbo, 0, mode), rows, k, eb, major)
    assert off.shape == (rows, k)
    assert len(np.unique(off)) == off.size
    assert off.min() == start and off.max() < start + footprint
    assert (off % eb == 0).all()  # elements stay naturally aligned


def test_ldmatrix_coords():
    for trans in (False, True):
        for num in (1, 2, 4):
            m = L.ldmatrix_coords(num, trans)
            assert m["addr_lane"].shape == (num, 8)
            assert (m["addr_lane"].ravel() == np.arange(8 * num)).all()
            grid = np.zeros((num, 8, 8), dtype=np.int64)
            np.add.at(grid, (m["mat"], m["row"], m["col"]), 1)
            assert (grid == 1).all()
    m = L.ldmatrix_coords(4, False)
    assert [(m["mat"][5, 2, h], m["row"][5, 2, h], m["col"][5, 2, h]) for h in (0, 1)] == [(2, 1, 2), (2, 1, 3)]
    m = L.ldmatrix_coords(4, True)
    assert [(m["row"][5, 0, h], m["col"][5, 0, h]) for h in (0, 1)] == [(2, 1), (3, 1)]
    s = L.stmatrix_coords(2, True)
    assert (s["row"] == L.ldmatrix_coords(2, True)["row"]).all()


# ---------------------------------------------------------------------------
# CuTe oracle
# ---------------------------------------------------------------------------

def _cutlass_include():
    try:
        import cutlass_library
    except ImportError:
        return None
    inc = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return inc if os.path.isfile(os.path.join(inc, "cute", "tensor.hpp")) else None


@pytest.fixture(scope="session")
def oracle(tmp_path_factory):
    inc = _cutlass_include()
    if inc is None:
        pytest.skip("CuTe oracle: pip package nvidia-cutlass (cutlass_library with CuTe headers) not installed")
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("CuTe oracle: g++ not found on PATH")
    src = Path(__file__).with_name("cute_oracle.cpp")
    exe = tmp_path_factory.mktemp("cute_oracle") / "cute_oracle"
    cmd = [gxx, "-std=c++17", "-O0", f"-I{inc}", "-I/usr/local/cuda/include",
           "-I/usr/local/cuda/include/cccl", str(src), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, "CuTe oracle failed to compile:\n" + res.stderr[-4000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=True).stdout
    return _parse(out)


def _parse(text):
    o = {"C": defaultdict(dict), "A": defaultdict(dict), "SWZ": {}, "ENC": [], "ATOM": [], "TILE": []}
    for line in text.splitlines():
        tok = line.split()
        if not tok:
            continue
        tag = tok[0]
        if tag == "C":
            dtype, n, t = tok[1], int(tok[2]), int(tok[3])
            o["C"][(dtype, n)][t] = np.array(tok[4:], dtype=np.int64).reshape(-1, 2)
        elif tag == "A":
            o["A"][int(tok[1])][int(tok[2])] = np.array(tok[3:], dtype=np.int64).reshape(-1, 2)
        elif tag == "SWZ":
            o["SWZ"][int(tok[1])] = np.array(tok[2:], dtype=np.int64).reshape(-1, 2)
        elif tag == "ENC":
            o["ENC"].append((*map(int, tok[1:6]), int(tok[6], 16)))
        elif tag == "ATOM":
            major, swz, eb, mn, k = tok[1], tok[2], int(tok[3]), int(tok[4]), int(tok[5])
            o["ATOM"].append((major, swz, eb, np.array(tok[6:], dtype=np.int64).reshape(mn, k)))
        elif tag == "TILE":
            major, swz, eb, order = tok[1], tok[2], int(tok[3]), tok[4]
            mn, k, desc = int(tok[5]), int(tok[6]), int(tok[7], 16)
            start, lbo, sbo, base, lt = map(int, tok[8:13])
            offs = np.array(tok[13:], dtype=np.int64).reshape(mn, k)
            o["TILE"].append(dict(major=major, swz=swz, eb=eb, order=order, desc=desc, start=start,
                                  lbo=lbo, sbo=sbo, base=base, lt=lt, offs=offs))
    return o


def _stack(per_thread):
    assert sorted(per_thread) == list(range(128))
    return np.stack([per_thread[t] for t in range(128)])  # [128, V, 2]


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_oracle_clayout_all_n(oracle, dtype):
    for n in ALL_N:
        cute = _stack(oracle["C"][(dtype, n)])
        rows, cols = L.wgmma_d_coords(n)
        # CuTe value index v is the register/element order of the fragment
        assert (cute[..., 0] == rows).all() and (cute[..., 1] == cols).all(), (dtype, n)
    # f16 accumulators: CuTe values 2r, 2r+1 are packed into register r
    r16, c16 = L.wgmma_d_coords_f16(64)
    cute = _stack(oracle["C"][("f16", 64)]).reshape(128, 16, 2, 2)
    assert (cute[..., 0] == r16).all() and (cute[..., 1] == c16).all()


@pytest.mark.parametrize("bits", [16, 8])
def test_oracle_alayout_rs(oracle, bits):
    cute = _stack(oracle["A"][bits])
    rows, cols = L.wgmma_a_reg_coords(bits)
    assert (cute[..., 0] == rows).all() and (cute[..., 1] == cols).all()


def test_oracle_swizzle(oracle):
    for b, mode in ((1, "32B"), (2, "64B"), (3, "128B")):
        pairs = oracle["SWZ"][b]
        assert (L.swizzle(pairs[:, 0], mode) == pairs[:, 1]).all(), mode


def test_oracle_desc_encoding(oracle):
    assert len(oracle["ENC"]) >= 9
    for start, lbo, sbo, base, lt, d in oracle["ENC"]:
        assert L.encode_desc(start << 4, lbo << 4, sbo << 4, base, lt) == d
        f = L.decode_desc(d)
        assert (f["start_address"], f["leading_byte_offset"], f["stride_byte_offset"],
                f["base_offset"], f["layout_type"]) == (start << 4, lbo << 4, sbo << 4, base, lt)


def test_oracle_layout_atoms(oracle):
    """CuTe Layout_{K,MN}_{INTER,SW32,SW64,SW128}_Atom<T> (with their swizzle) as element -> byte."""
    assert len(oracle["ATOM"]) == 24
    for major, swz, eb, cute in oracle["ATOM"]:
        mn, k = cute.shape
        # a single atom: one 8-row (K-major) / 8-K-row (MN-major) group, so only
        # in-atom addressing and the swizzle matter; for MN "none" the MN core
        # matrices (one here) are SBO apart, K groups (one here) LBO apart.
        desc = L.encode_desc(0, 0, 0, 0, swz)
        ours = L.operand_byte_offsets(desc, mn, k, eb, major)
        assert (ours == cute).all(), (major, swz, eb)


def test_oracle_tiles_and_make_gmma_desc(oracle):
    """tile_to_shape(atom) pieces + make_gmma_desc: our decode of CuTe's descriptor must
    address exactly the bytes CuTe's swizzled tensor addresses."""
    tiles = oracle["TILE"]
    assert len(tiles) == 72
    seen = set()
    for t in tiles:
        f = L.decode_desc(t["desc"])
        assert f["start_address"] == 0  # host-side cast_smem_ptr_to_uint() returns 0
        assert (f["leading_byte_offset"], f["stride_byte_offset"], f["base_offset"], f["layout_type"]) == (
            t["lbo"] << 4, t["sbo"] << 4, t["base"], t["lt"])
        assert f["swizzle"] == t["swz"]
        desc = L.encode_desc(t["start"], f["leading_byte_offset"], f["stride_byte_offset"],
                             f["base_offset"], f["swizzle"])
        mn, k = t["offs"].shape
        ours = L.operand_byte_offsets(desc, mn, k, t["eb"], t["major"])
        assert (ours == t["offs"]).all(), {k_: v for k_, v in t.items() if k_ != "offs"}
        seen.add((t["major"], t["swz"], t["eb"]))
    assert len(seen) == 2 * 4 * 3
