"""pykernels.explain's launch choice for the GEMM kernels (issue 14): the config, stages, grid
and split count it names are the ones the call's launch plan uses (the plans of real calls
through the public API, captured instead of run), its ranking is the heuristic's, and a bad
argument raises the call's own error. CPU tensors, backend "emu": no GPU and no emulation
(the plans are captured before they would run)."""
import random
import re

import pytest
import torch

import pykernels as pk
from pykernels import reference as R
from pykernels.cuda import bf16_gemm as CB
from pykernels.cuda import gemm as CG

LAUNCH = re.compile(r"launch: (\S+), grid (\d+), cluster (\d+), (\d+) stages \(\d+ of \d+ bytes shared memory\)"
                    r"(?:, split-K (\d+) K ranges)?")


@pytest.fixture
def plans(monkeypatch):
    """The launch plans of the calls made while the fixture is active (captured, not run)."""
    captured = []
    monkeypatch.setattr(CG, "_run", lambda plan, executor: captured.append(plan))
    monkeypatch.setattr(CG, "run_plan", lambda plan, executor: captured.append(plan))
    monkeypatch.setattr(CB, "run_plan", lambda plan, executor: captured.append(plan))
    return captured


def _named(text: str) -> tuple:
    """(function, grid, cluster, stages, splits) of the emu backend's launch line."""
    found = LAUNCH.findall(text)
    assert len(found) == 1, text
    function, grid, cluster, stages, splits = found[0]
    return function, int(grid), int(cluster), int(stages), int(splits or 1)


def _planned(plan) -> tuple:
    return plan.function, plan.grid[0], plan.cluster[0], CG.arg(plan, "stages"), CG.arg(plan, "splits")


def _fp8(*shape):
    return (torch.randn(*shape) * 0.5).to(torch.float8_e4m3fn)


def _normal(m, n, k):
    a, sfa = R.per_token_cast_to_fp8(torch.randn(m, k))
    b, sfb = R.per_block_cast_to_fp8(torch.randn(n, k))
    return (a, sfa), (b, sfb), torch.full((m, n), float("nan"), dtype=torch.bfloat16)


def _masked(g, m_max, n, k):
    kb = -(-k // 128)
    a = (_fp8(g, m_max, k), torch.rand(g, m_max, kb) + 0.5)
    b = (_fp8(g, n, k), torch.rand(g, -(-n // 128), kb) + 0.5)
    masked_m = torch.randint(0, m_max + 1, (g,), dtype=torch.int32)
    return a, b, torch.full((g, m_max, n), float("nan"), dtype=torch.bfloat16), masked_m


def _contiguous(g, m, n, k):
    kb = -(-k // 128)
    a = (_fp8(m, k), torch.rand(m, kb) + 0.5)
    b = (_fp8(g, n, k), torch.rand(g, -(-n // 128), kb) + 0.5)
    m_indices = torch.sort(torch.randint(-1, g, (m,), dtype=torch.int32)).values
    return a, b, torch.full((m, n), float("nan"), dtype=torch.bfloat16), m_indices


def _check_same(op: str, args: tuple, kwargs: dict, plans: list):
    text = pk.explain(op, *args, backend="emu", **kwargs)
    plans.clear()
    getattr(pk, op)(*args, backend="emu", **kwargs)
    assert plans, f"{op}: the call launched nothing"
    assert _named(text) == _planned(plans[0]), text
    return text


def test_explain_names_the_plans_config_for_random_shapes(seed, plans):
    rng = random.Random(seed)
    for _ in range(3):
        m, n, k = rng.randint(1, 600), 8 * rng.randint(1, 300), 16 * rng.randint(1, 160)
        _check_same("fp8_gemm_nt", _normal(m, n, k), {}, plans)
        g = rng.randint(1, 6)
        a, b, out, m_indices = _contiguous(g, rng.randint(1, 700), n, k)
        _check_same("m_grouped_fp8_gemm_nt_contiguous", (a, b, out, m_indices), {}, plans)
        m_max = rng.randint(1, 512)
        a, b, out, masked_m = _masked(g, m_max, n, k)
        for expected_m in (0, rng.randint(1, m_max)):          # 0: not given (m_max assumed)
            text = _check_same("m_grouped_fp8_gemm_nt_masked", (a, b, out, masked_m, expected_m), {}, plans)
            assert (f"expected_m {expected_m} rows per group" if expected_m
                    else f"m_max {m_max} (expected_m not given)") in text
    a, b, out, masked_m = _masked(2, 64, 256, 256)                 # a hint above m_max: m_max rows scored
    text = _check_same("m_grouped_fp8_gemm_nt_masked", (a, b, out, masked_m, 1000), {}, plans)
    assert "expected_m 1000 (clamped to m_max 64)" in text and "scored 64 x 256 x 256" in text


def test_explain_names_the_split_k_launch(plans):
    # small M, long K: choose_split_k's one-wave rule splits K (checked below, not assumed)
    m, n, k = 16, 1024, 7168
    cfg, splits = CG.split_k_choice(m, n, k, torch.bfloat16, 128, CG.num_sms(torch.device("cpu")))
    assert splits > 1 and cfg.split_k
    text = _check_same("fp8_gemm_nt", _normal(m, n, k), {}, plans)
    assert _named(text)[4] == splits and "split-K" in text
    assert plans[1].function == CG.REDUCE_FUNCTION            # the second pass follows


def test_explain_ranks_as_the_heuristic_does():
    m, n, k = 256, 2048, 1024
    text = pk.explain("fp8_gemm_nt", *_normal(m, n, k), backend="emu")
    ranking = CG.rank_configs(m, n, k, candidates=CG.auto_configs())
    listed = re.findall(r"(?:->|  ) (\d+)x(\d+)\s+([\d,]+) clk\s+([\d.]+)x", text)
    assert len(listed) == min(len(ranking.single), 5)
    for (bm, bn, clk, rel), (cfg, t) in zip(listed, ranking.single):
        assert (int(bm), int(bn)) == (cfg.block_m, cfg.block_n)
        assert int(clk.replace(",", "")) == round(t)
        assert float(rel) == pytest.approx(t / ranking.single[0][1], abs=0.006)
    assert f"MULTICAST_GAIN {CG.MULTICAST_GAIN}" in text or "multicast pairs: none" in text


def test_expected_m_changes_the_masked_choice_where_the_model_does(plans):
    g, m_max, n, k = 2, 1024, 2048, 1024
    small, full = (CG.choose_config(rows, n, k, g, candidates=CG.auto_configs()) for rows in (16, m_max))
    assert small != full          # the model itself prefers another tile for 16 rows than for m_max
    a, b, out, masked_m = _masked(g, m_max, n, k)
    named = {}
    for expected_m in (16, 0):
        text = _check_same("m_grouped_fp8_gemm_nt_masked", (a, b, out, masked_m, expected_m), {}, plans)
        named[expected_m] = _named(text)[0]
    assert (named[16], named[0]) == (small.function, full.function)


def test_explain_bf16_names_the_plans_config(seed, plans):
    rng = random.Random(seed)
    for _ in range(3):
        m, n, k = rng.randint(1, 3000), 8 * rng.randint(1, 300), 16 * rng.randint(1, 40)
        args = (torch.randn(m, k, dtype=torch.bfloat16), torch.randn(n, k, dtype=torch.bfloat16),
                torch.full((m, n), float("nan"), dtype=torch.bfloat16))
        text = _check_same("bf16_gemm_nt", args, {}, plans)
        assert "choose_config's hand rule" in text


def test_explain_on_auto_still_describes_the_emu_launch():
    text = pk.explain("fp8_gemm_nt", *_normal(64, 256, 256))
    assert re.search(r"^-> reference", text, re.M) and len(LAUNCH.findall(text)) == 1


def test_a_bad_argument_raises_the_calls_error():
    a, b, out, masked_m = _masked(2, 64, 256, 256)
    with pytest.raises(ValueError) as call:
        pk.m_grouped_fp8_gemm_nt_masked(a, b, out, masked_m, -1, backend="emu")
    with pytest.raises(ValueError) as explained:
        pk.explain("m_grouped_fp8_gemm_nt_masked", a, b, out, masked_m, -1, backend="emu")
    assert str(explained.value) == str(call.value) and "expected_m" in str(call.value)
    a, b, out, m_indices = _contiguous(2, 64, 256, 256)
    with pytest.raises(TypeError) as call:
        pk.m_grouped_fp8_gemm_nt_contiguous(a, b, out, m_indices.long(), backend="emu")
    with pytest.raises(TypeError) as explained:
        pk.explain("m_grouped_fp8_gemm_nt_contiguous", a, b, out, m_indices.long(), backend="emu")
    assert str(explained.value) == str(call.value) and "m_indices" in str(call.value)


# --- MLA decode and sparse decode -------------------------------------------------------------

PLAN_LINE = re.compile(r"(launch|then): (\S+), grid (\d+)x(\d+)x(\d+), (\d+) threads, (\d+) bytes shared memory")


def _plan_lines(text: str) -> list:
    return [(f, (int(x), int(y), int(z)), int(t), int(smem)) for _, f, x, y, z, t, smem in PLAN_LINE.findall(text)]


def _plan_facts(plan) -> tuple:
    return plan.function, tuple(plan.grid), plan.block[0], plan.shared_bytes


@pytest.fixture
def attention_plans(monkeypatch):
    """The MLA / sparse decode launch plans of the calls made meanwhile (captured, not run)."""
    from pykernels.cuda import dsa as CD
    from pykernels.cuda import mla as CM
    captured = []
    monkeypatch.setattr(CM, "run_plan", lambda plan, executor: captured.append(plan))
    monkeypatch.setattr(CD, "run_plan", lambda plan, executor: captured.append(plan))
    return captured


@pytest.mark.parametrize("s_q,h_q,h_kv,fp8", [(1, 16, 1, False), (2, 16, 1, True), (2, 128, 1, True),
                                              (1, 64, 2, False)])
def test_explain_names_the_mla_decode_plans(seed, attention_plans, s_q, h_q, h_kv, fp8):
    import pykernels.mla as M

    from .mla_cases import make_problem
    rng = random.Random(seed)
    seqlens = [rng.randint(0, 400) for _ in range(rng.randint(1, 4))]
    q, cache, table, lens = make_problem(seqlens, s_q, h_q, h_kv=h_kv)
    if fp8:
        cache = M.quantize_kv_cache_fp8(cache)
    meta, splits = M.get_mla_metadata(lens, s_q * h_q // h_kv, h_kv)
    args = (q, cache, table, lens, 512, meta, splits)
    text = pk.explain("flash_mla_with_kvcache", *args, backend="emu")
    M.flash_mla_with_kvcache(*args, backend="emu")
    assert len(attention_plans) == 2 * h_kv                    # a decode + combine pair per KV head
    assert _plan_lines(text) == [_plan_facts(p) for p in attention_plans[:2]]
    narrow = s_q * h_q // h_kv <= 32
    assert ("the narrow kernel" in text) == narrow and ("FP8 cache" in text) == fp8
    assert f"schedule: {meta.shape[0]} SM partitions" in text


@pytest.mark.parametrize("s_q,h_q,schedule", [(2, 16, False), (1, 32, True), (1, 64, False)])
def test_explain_names_the_sparse_decode_plans(seed, attention_plans, s_q, h_q, schedule):
    import pykernels.dsa as D
    import pykernels.mla as M
    b, topk, pages = 2, 64 * random.Random(seed).randint(1, 3), 5
    cache = M.quantize_kv_cache_fp8(torch.randn(pages, 64, 1, 576).bfloat16())
    q = torch.randn(b, s_q, h_q, 576).bfloat16()
    idx = torch.randint(-1, pages * 64, (b, s_q, topk), dtype=torch.int32)
    meta = splits = None
    if schedule:
        meta, splits = M.get_mla_metadata(torch.full((b,), topk, dtype=torch.int32), s_q * h_q, 1, h_q, True, topk)
    text = pk.explain("flash_mla_sparse_decode", q, cache, idx, None, None, None, meta, splits, backend="emu")
    D.flash_mla_sparse_decode(q, cache, idx, None, None, None, meta, splits, backend="emu")
    assert _plan_lines(text) == [_plan_facts(p) for p in attention_plans]
    assert ("the narrow kernel" in text) == (h_q <= 32)
    assert ("made by the call" in text) == (not schedule)


def test_explain_names_the_resident_a_launch(plans):
    # a short K and >= 2 units per CTA: the plan swaps in the *_ares twin (resident_geometry),
    # with its own stages and grid; explain names that launch, not the streamed tile's
    args = _normal(1024, 5280, 512)
    text = _check_same("fp8_gemm_nt", args, {}, plans)
    assert _named(text)[0].endswith("_ares"), text
