"""pykernels.perf.measured: which GPU measurement each (shape, kernel, config) row takes
(the latest run by the repository's history), which rows are flagged stale (measured
before a later change to that config's kernel), and the table's ratios and summary."""
import json

import pytest

from pykernels import perf
from pykernels.perf import measured as M

M_PART = perf.part("h200")


def _run(root, name, commit, rows):
    d = root / name
    d.mkdir()
    meta = {"source": "gpu", "gpu": "NVIDIA H200", "git_commit": commit}
    (d / "deepgemm-vs-ours.json").write_text(json.dumps({"meta": meta, "rows": rows}))


def _row(impl, config, kernel_us, m=128, n=256, k=512):
    return {"source": "gpu", "m": m, "n": n, "k": k, "impl": impl, "config": config,
            "kernel_seconds": kernel_us * 1e-6, "seconds": 2 * kernel_us * 1e-6}


def test_latest_run_wins_and_older_kernels_are_flagged(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "RESULTS", tmp_path)
    # run 2 (8d5587c) precedes run 3 (e5015a6) in this repository's history, whatever the names
    _run(tmp_path, "b-run2", "8d5587ca90e29b1fd8ba1f42a42f9b75e6f6e9fa",
         [_row("pykernels_cuda", "m128n128", 30.0), _row("pykernels_cuda", "m128n160_mc2", 90.0),
          _row("pykernels_cuda", "auto=m128n128", 31.0), _row("deepgemm", "m128n64c1s8", 20.0)])
    _run(tmp_path, "a-run3", "e5015a6", [_row("pykernels_cuda", "m128n128", 25.0)])
    rows = {r.key: r for r in M.measured_rows()}
    assert set(rows) == {"128x256x512 ours m128n128", "128x256x512 ours m128n160_mc2",
                         "128x256x512 deepgemm m128n64c1s8"}             # auto= rows are skipped
    assert rows["128x256x512 ours m128n128"].kernel_us == pytest.approx(25.0)   # run 3's figure
    assert rows["128x256x512 ours m128n128"].stale == ""
    assert "before e5015a6" in rows["128x256x512 ours m128n160_mc2"].stale
    dg = rows["128x256x512 deepgemm m128n64c1s8"]
    assert (dg.block_m, dg.block_n, dg.cluster, dg.stale) == (128, 64, 1, "")
    assert rows["128x256x512 ours m128n160_mc2"].tiles_name == "pk_fp8_gemm_nt_m128n160_mc2"

    preds = {"128x256x512 ours m128n128": {"us": 30.0}, "128x256x512 ours m128n160_mc2": {"us": 45.0},
             "128x256x512 deepgemm m128n64c1s8": {"us": 16.0}}
    text = M.table(M.measured_rows(), preds, previous={"128x256x512 ours m128n128": {"us": 20.0}})
    # 2 tiles on 2 SMs; the busiest SM: one tile of 4 K blocks x ((128 + 128) x 128 + 128 x 4) bytes in and
    # 128 x 128 x 2 out, in 25 us
    port = (4 * (256 * 128 + 512) + 128 * 128 * 2) / (25e-6 * M_PART.clock_hz)
    assert f"| 128x256x512 | ours | m128n128 | 25.0 (50.0) | e5015a6 | {port:.1f} | 30.0 | 1.20 | 0.80 |" in text
    assert "| 0.50 (stale) |" in text                                     # 45 / 90, out of the summary
    assert "Summary over 2 current rows" in text and "median 1.00" in text and "0 of 2 within 15%" in text


def test_config_names_are_parsed_or_rejected():
    assert M._parse_config("ours", "m64n32") == (64, 32, 1)
    assert M._parse_config("deepgemm", "m128n144c2s5") == (128, 144, 2)
    with pytest.raises(ValueError, match="config: expected our form"):
        M._parse_config("ours", "m128x160")
