"""The registry of ops and backends: what is registered, how "auto" chooses, what
explain() says, and that the custom ops are the registry's entry points too."""
import dataclasses

import pytest
import torch

import pykernels as pk
from pykernels import registry
from pykernels import reference as R

OPS = {
    "per_token_cast_to_fp8": {"cuda", "emu", "triton", "reference"},
    "per_block_cast_to_fp8": {"cuda", "emu", "triton", "reference"},
    "fp8_gemm_nt": {"cuda", "emu", "triton", "reference"},
    "m_grouped_fp8_gemm_nt_contiguous": {"cuda", "emu", "triton", "reference"},
    "m_grouped_fp8_gemm_nt_masked": {"cuda", "emu", "triton", "reference"},
    "bf16_gemm_nt": {"cuda", "emu", "triton", "reference"},
    "get_mla_metadata": {"triton", "reference"},
    "flash_mla_with_kvcache": {"cuda", "emu", "triton", "reference"},
    "ep_dispatch_combine": {"cuda", "emu", "triton", "reference"},
}


def test_every_op_and_backend_is_registered():
    for name, backends in OPS.items():
        assert set(registry.get(name).backends) == backends, name
    for name in OPS:
        if name != "ep_dispatch_combine":       # EP's transports are pykernels.ep.Buffer's
            assert hasattr(torch.ops.pykernels, name), name


def test_unknown_op_and_backend_names_are_named_in_the_error():
    with pytest.raises(ValueError, match=r"op: expected one of .*got 'gemm'"):
        registry.get("gemm")
    x = torch.randn(4, 128)
    with pytest.raises(ValueError, match=r"backend: expected one of .*'reference'.*got 'bogus'"):
        pk.per_token_cast_to_fp8(x, backend="bogus")
    with pytest.raises(ValueError, match=r"backend: expected one of .*got 'bogus'"):
        torch.ops.pykernels.per_token_cast_to_fp8(x, "bogus")


@dataclasses.dataclass
class _Problem:
    device: torch.device

    def describe(self):
        return f"a test problem on {self.device}"


def _toy_op(reasons: dict):
    op = registry.Op("toy", lambda device: _Problem(torch.device(device)))
    for name, reason in reasons.items():
        op.add(registry.Backend(name, lambda p, r=reason: r, lambda p, n=name: n))
    return op


def test_auto_takes_the_first_supporting_backend_in_the_device_order():
    op = _toy_op({"cuda": "N must be a multiple of 8", "triton": None, "reference": None, "emu": None})
    assert op(_Problem(torch.device("cuda")), "auto") == "triton"
    assert op(_Problem(torch.device("cpu")), "auto") == "reference"
    op = _toy_op({"cuda": None, "triton": None, "reference": None})
    assert op(_Problem(torch.device("cuda")), "auto") == "cuda"


def test_auto_with_no_supporting_backend_lists_the_reasons():
    op = _toy_op({"cuda": "no GPU driver", "triton": "no GPU", "reference": "too big"})
    with pytest.raises(ValueError, match=r"backend: 'auto' found no backend.*cuda: no GPU driver.*triton: no GPU"):
        op(_Problem(torch.device("cuda")), "auto")


def test_a_named_backend_that_cannot_run_says_why():
    op = _toy_op({"cuda": "no GPU driver", "reference": None})
    with pytest.raises(ValueError, match=r"backend: 'cuda' cannot run this toy call: no GPU driver"):
        op(_Problem(torch.device("cuda")), "cuda")
    with pytest.raises(ValueError, match=r"backend: 'emu' is not available for toy; available: cuda, reference"):
        op(_Problem(torch.device("cpu")), "emu")


def test_explain_names_every_backend_and_its_reason(capsys):
    a, sfa = R.per_token_cast_to_fp8(torch.randn(16, 256))
    b, sfb = R.per_block_cast_to_fp8(torch.randn(100, 256))          # N = 100: not a multiple of 8
    out = torch.empty(16, 100, dtype=torch.bfloat16)
    text = pk.explain("fp8_gemm_nt", (a, sfa), (b, sfb), out)
    assert capsys.readouterr().out.strip() == text.strip()
    lines = text.splitlines()
    assert lines[0] == "fp8_gemm_nt: normal m=16 n=100 k=256, torch.bfloat16 out on cpu"
    by_name = {line.split()[-2] if line.startswith("->") else line.split()[0]: line for line in lines[1:-1]}
    assert "runs on GPU tensors" in by_name["cuda"]
    assert "multiple of 8" in by_name["emu"]          # the kernel's own limit, as a reason
    assert by_name["reference"].startswith("->") and "supported" in by_name["reference"]
    assert "auto tries reference on cpu tensors" in lines[-1]


def test_explain_validates_like_the_call():
    with pytest.raises(ValueError, match="x: expected a 2-D tensor"):
        pk.explain("per_token_cast_to_fp8", torch.randn(2, 3, 128))


def test_cuda_backend_reports_a_missing_build(monkeypatch):
    from pykernels.runtime import executors
    monkeypatch.setattr(executors, "gpu_unavailable_reason", lambda: "pykernels._C is not built (test)")
    cuda = registry.get("per_token_cast_to_fp8").backends["cuda"]
    assert cuda.supports(_Problem(torch.device("cuda"))) == "pykernels._C is not built (test)"


def test_custom_ops_validate_as_the_api_does():
    a, sfa = R.per_token_cast_to_fp8(torch.randn(16, 256))
    b, sfb = R.per_block_cast_to_fp8(torch.randn(64, 256))
    out = torch.full((16, 64), float("nan"), dtype=torch.bfloat16)
    for call in (lambda: pk.fp8_gemm_nt((a, sfa[:, :1]), (b, sfb), out, backend="reference"),
                 lambda: torch.ops.pykernels.fp8_gemm_nt(a, sfa[:, :1], b, sfb, out, "reference")):
        with pytest.raises(ValueError, match=r"sfa: expected shape \[16, 2\], got \[16, 1\]"):
            call()
    assert out.isnan().all()                            # nothing written by a rejected call
