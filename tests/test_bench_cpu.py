"""CPU checks of the benchmark harness: counts, shape sets, reports, no-GPU exit."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report as R, shapes as S
from bench.timing import summarize

ROOT = Path(__file__).resolve().parent.parent
PEAKS = {"bw_gbps": 3000.0, "bf16_tflops": 700.0, "fp8_tflops": 1400.0}


def test_counts_normal_by_hand():
    s = S.Shape("normal", 1, 64, 2112, 7168)
    assert S.flops(s) == 2 * 64 * 2112 * 7168 == 1_937_768_448
    # A 64*7168 + B 2112*7168 (1 B each) + sfa 64*56*4 + sfb 17*56*4 (2112/128 rounds up) + out 64*2112*2
    assert S.bytes_moved(s) == 458_752 + 15_138_816 + 14_336 + 3_808 + 270_336 == 15_886_048
    assert S.bytes_moved(s, "bf16") == 2 * (458_752 + 15_138_816) + 270_336
    assert S.bytes_moved(s, "fp8_tensor") == 458_752 + 15_138_816 + 8 + 270_336


def test_counts_grouped_by_hand():
    s = S.Shape("contiguous", 8, 4096, 7168, 2048)
    assert S.flops(s) == 8 * 2 * 4096 * 7168 * 2048 == 962_072_674_304
    a, b = 8 * 4096 * 2048, 8 * 7168 * 2048            # 67_108_864, 117_440_512
    sfa, sfb = 8 * 4096 * 16 * 4, 8 * 56 * 16 * 4       # 2_097_152, 28_672
    out = 8 * 4096 * 7168 * 2                            # 469_762_048
    assert S.bytes_moved(s) == a + b + sfa + sfb + out == 656_437_248
    with pytest.raises(ValueError):
        S.bytes_moved(s, "fp16")


@pytest.mark.parametrize("quick", [False, True])
def test_shape_sets(quick):
    for op in S.OPS:
        got = S.shape_set(quick, [op])
        assert got and all(s.op == op and s.k % 128 == 0 for s in got)
    assert len(S.shape_set(quick)) == sum(len(S.shape_set(quick, [op])) for op in S.OPS)
    assert len(S.shape_set(False, ["normal"])) == 6
    assert S.Shape("masked", 4, 256, 7168, 2048).label() == "4x256x7168x2048"


def test_summarize():
    t = summarize([3.0, 1.0, 2.0, 10.0])
    assert (t.median, t.min, t.max) == (2.5, 1.0, 10.0)
    with pytest.raises(ValueError):
        summarize([])


def _raw():
    s = S.Shape("normal", 1, 128, 4096, 7168)
    base = dict(op="normal", shape=s.label(), flops=S.flops(s), seconds_min=None, seconds_max=None, note="")
    return [dict(base, impl="cublas_bf16", precision="bf16", bytes=S.bytes_moved(s, "bf16"), seconds=40e-6),
            dict(base, impl="cublaslt_fp8_tensor", precision="fp8_tensor", bytes=S.bytes_moved(s, "fp8_tensor"), seconds=30e-6),
            dict(base, impl="pykernels_triton", precision="fp8_block", bytes=S.bytes_moved(s), seconds=20e-6),
            dict(base, impl="pykernels_cuda", precision="fp8_block", bytes=S.bytes_moved(s), seconds=None,
                 note="backend: 'cuda' is not available")]


def test_derive_figures():
    rows = {r["impl"]: r for r in R.derive(_raw(), PEAKS)}
    tri = rows["pykernels_triton"]
    assert tri["tflops"] == pytest.approx(2 * 128 * 4096 * 7168 / 20e-6 / 1e12)
    assert tri["gbps"] == pytest.approx(tri["bytes"] / 20e-6 / 1e9)
    assert tri["ratio_to_cublas_bf16"] == pytest.approx(2.0)
    assert tri["ratio_to_cublas_fp8"] == pytest.approx(1.5)
    assert tri["ratio_to_triton"] == pytest.approx(1.0)
    # Small M: memory bound, so the roof is bandwidth * intensity, below the FP8 peak.
    roof = PEAKS["bw_gbps"] * tri["ai"] / 1e3
    assert roof < PEAKS["fp8_tflops"]
    assert tri["roofline_fraction"] == pytest.approx(tri["tflops"] / roof)
    assert rows["pykernels_cuda"]["tflops"] is None and rows["pykernels_cuda"]["ratio_to_triton"] is None
    assert R.roofline_tflops(1e6, 700.0, 3000.0) == 700.0


def test_format_table():
    text = R.format_table(R.derive(_raw(), PEAKS))
    lines = text.splitlines()
    assert len(lines) == 5 and lines[0].split()[:6] == ["op", "shape", "impl", "us", "kern_us", "tflops"]
    tri = next(line for line in lines if "pykernels_triton" in line).split()
    assert tri[3] == "20.0" and tri[4] == "-" and tri[8] == "2.00" and tri[9] == "1.50"
    cuda = next(line for line in lines if "pykernels_cuda" in line)
    assert cuda.split()[3] == "-" and "not available" in cuda


def test_write_json_round_trip(tmp_path):
    rows = R.derive(_raw(), PEAKS)
    meta = dict(gpu="NVIDIA H100 80GB HBM3", date="2025-01-02", git_commit=R.git_commit(ROOT),
                torch="x", triton="y")
    path = R.write_json(tmp_path / "sub" / f"{R.slug(meta['gpu'])}-{meta['date']}.json", meta, PEAKS, rows)
    assert path.name == "nvidia-h100-80gb-hbm3-2025-01-02.json"
    data = json.loads(path.read_text())
    for key in ("gpu", "date", "git_commit", "torch", "triton", "peaks", "results"):
        assert key in data
    assert len(data["git_commit"]) == 40 and data["peaks"] == PEAKS and data["results"] == rows
    for key in ("op", "shape", "impl", "seconds", "tflops", "gbps", "ratio_to_cublas_bf16",
                "ratio_to_cublas_fp8", "ratio_to_triton", "roofline_fraction"):
        assert key in data["results"][0]


def test_roofline_png(tmp_path):
    path = R.plot_roofline(tmp_path / "r.png", PEAKS, R.derive(_raw(), PEAKS), title="t")
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_without_gpu_exits_2():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, "-m", "bench", "--quick"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "bench: no CUDA GPU available; nothing measured" in p.stderr
    assert p.stdout == ""


def test_mla_configs_and_sdpa_baseline_on_cpu(monkeypatch):
    # The SDPA baseline must compute MLA decode itself, or its ratios mean nothing.
    from bench import mla as BM
    from pykernels.reference import mla as RM
    from pykernels.metrics import calc_diff
    assert len(BM.FULL) >= 8 and {c.h_q for c in BM.FULL} == {16, 128} and {c.s_q for c in BM.FULL} == {1, 2}
    monkeypatch.setattr(BM, "DEVICE", "cpu")
    cfg = BM.Config(3, 2, 16, 150)
    d = BM.make_inputs(cfg, seed=1)
    out = BM.sdpa_gathered(d["q"], d["cache"], d["table"], d["seqlens"])
    ref, _ = RM.flash_mla_with_kvcache(d["q"], d["cache"], d["table"], d["seqlens"], 512, causal=True)
    assert calc_diff(out.float(), ref.float()) < 1e-5
    c = BM.cost(cfg, d)
    assert c["flops"] == sum(2 * 1088 * 2 * 16 * n for n in d["seqlens"].tolist())


@pytest.mark.parametrize("mode", ["normal", "low_latency"])
def test_ep_bench_steps_run_on_the_emulator(monkeypatch, mode):
    # The benchmark's callables run end to end (on the emulator here) and the byte count
    # per rank is the number of (token, destination) copies times the row size.
    import torch
    from bench import ep as BE
    monkeypatch.setattr(BE, "DEVICE", "cpu")
    monkeypatch.setattr(BE, "node", lambda cfg, channels=2, _n=BE.node: _n(cfg, channels))
    cfg = BE.Config(mode, 2, 12, hidden=256, topk=4, experts=8)
    d = BE.make_inputs(cfg, seed=3)
    fns = BE.steps(cfg, BE.node(cfg), d)
    assert set(fns) == ({"dispatch", "combine"} if mode == "normal" else {"dispatch+combine", "_check"})
    for fn in fns.values():
        fn()
    topk = d["topk"][0]
    if mode == "normal":
        copies = sum(len(set((row // 4).tolist())) for row in topk)
        assert BE.sent_bytes(cfg, d, "dispatch") == copies * (256 + 4 * 2 + 12 * 4)
    else:
        assert BE.sent_bytes(cfg, d, "dispatch") == int((topk >= 0).sum()) * 2 * 256
    assert all(x.device.type == "cpu" for x in d["weights"]) and torch.is_tensor(topk)


def test_git_commit_from_the_environment(monkeypatch, tmp_path):
    # a copy of the tree without .git (a lent GPU machine) records the commit given to it
    monkeypatch.delenv("PK_GIT_COMMIT", raising=False)
    assert R.git_commit(tmp_path) == "unknown"
    monkeypatch.setenv("PK_GIT_COMMIT", "abc123")
    assert R.git_commit(tmp_path) == "abc123"


def test_gpu_session_script_is_valid_bash():
    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for needed in ("-m pytest -q -m gpu", "-m bench --ops", "bench.peers.gpu_gemm run", "PK_GIT_COMMIT", "timeout"):
        assert needed in text


def test_cli_model_writes_predictions_marked_model(tmp_path):
    # No GPU needed: the quick GEMM shapes of ours (and DeepGEMM's where its wheel is
    # installed) on the H800 model; every row and the file itself say "model".
    out = subprocess.run([sys.executable, "-m", "bench", "--model", "h800", "--quick", "--ops", "normal",
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = tmp_path.glob("model-h800-*-quick.json")
    data = json.loads(path.read_text())
    assert data["source"] == "model" and data["part"].startswith("H800") and data["model_version"]
    ours = [r for r in data["results"] if r["impl"] == "pykernels-cuda"]
    assert len(ours) == len(S.shape_set(True, ["normal"]))
    assert all(r["source"] == "model" and "model (H800" in r["note"] for r in data["results"])
    assert all(r["seconds"] and r["seconds"] > 0 and r["tflops"] < data["peaks"]["fp8_tflops"] for r in ours)


def test_cli_model_predicts_mla_decode(tmp_path):
    # MLA decode on the model: one row per quick configuration, marked model, each below
    # the part's bf16 peak and its HBM bandwidth
    out = subprocess.run([sys.executable, "-m", "bench", "--model", "h800", "--quick", "--ops", "mla,ep",
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "not modelled: ep" in out.stderr
    (path,) = tmp_path.glob("model-h800-*-quick.json")
    rows = json.loads(path.read_text())["results"]
    peaks = json.loads(path.read_text())["peaks"]
    from bench import mla as BM
    assert [r["shape"] for r in rows] == [c.label() for c in BM.QUICK]
    assert all(r["source"] == "model" and r["op"] == "mla" and r["seconds"] > 0 for r in rows)
    assert all(r["tflops"] < peaks["bf16_tflops"] and r["gbps"] < peaks["bw_gbps"] for r in rows)
