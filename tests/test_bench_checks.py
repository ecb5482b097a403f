"""The benchmarks check our outputs against the reference backend before timing them:
a wrong kernel gets a 'wrong output' note, never a figure (CPU: reference backend)."""
import pytest

from bench import baselines, mla, shapes as S


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(baselines, "DEVICE", "cpu")
    monkeypatch.setattr(mla, "DEVICE", "cpu")


@pytest.mark.parametrize("op", S.OPS)
def test_gemm_check_passes_the_right_answer_and_names_a_wrong_one(on_cpu, op):
    s = S.QUICK[op][0]
    d = baselines.make_inputs(s)
    want = baselines.build("pykernels_reference", s, d)().clone()
    got = baselines.build("pykernels_reference", s, d)()
    assert baselines.wrong_output("pykernels_cuda", got, want) == ""
    got.view(-1)[:: 7] += 1                       # a few wrong elements
    assert "wrong output: calc_diff" in baselines.wrong_output("pykernels_cuda", got, want)
    assert baselines.wrong_output("cublas_bf16", got, want) == ""    # baselines are not checked


def test_mla_check_passes_the_right_answer_and_names_a_wrong_one(on_cpu):
    cfg = mla.QUICK[0]
    d = mla.make_inputs(cfg, seed=1)
    want = mla.build("pykernels_reference", cfg, d)()
    got = tuple(t.clone() for t in mla.build("pykernels_reference", cfg, d)())
    assert mla.wrong_output("pykernels_triton", got, want) == ""
    got[0][0, 0, 0, :5] = float("nan")
    assert "wrong output" in mla.wrong_output("pykernels_triton", got, want)
