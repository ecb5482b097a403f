"""bench/model.py: model rows in bench's row format, marked "source": "model", with the
prediction's time and label, for every layout."""
import types

import pytest

from bench import model as BM


def test_model_rows_carry_the_prediction_and_say_model(monkeypatch):
    calls = []

    def fake(m, n, k, part, kernel, layout, groups):
        calls.append((m, n, k, part, kernel, layout, groups))
        return types.SimpleNamespace(seconds=1e-6 * (m + n + k), config=f"cfg-{kernel}", l2_hit=0.5)
    monkeypatch.setattr(BM, "predict", fake)
    rows = BM.model_rows("h800", quick=True, ops=("normal", "masked"))
    normal = [r for r in rows if r["op"] == "normal"]
    masked = [r for r in rows if r["op"] == "masked"]
    assert normal and masked and all(r["source"] == "model" for r in rows)
    for r in normal + masked:
        assert r["seconds"] == pytest.approx(1e-6 * (r["m"] + r["n"] + r["k"]))
        assert r["note"].startswith("model (H800, model version") and "cfg-" in r["note"]
    assert {c[4] for c in calls} == {"ours", "deepgemm"} and all(c[3] == "h800" for c in calls)
    assert {(c[5], c[6]) for c in calls} == {("normal", 1)} | {("masked", r["groups"]) for r in masked}


def test_model_rows_report_a_failed_prediction_without_a_figure(monkeypatch):
    def fail(*a, **kw):
        raise RuntimeError("peer headers missing")
    monkeypatch.setattr(BM, "predict", fail)
    rows = BM.model_rows("h100", quick=True, ops=("normal",), impls=("deepgemm",))
    assert rows and all(r["seconds"] is None and "peer headers missing" in r["note"] for r in rows)
