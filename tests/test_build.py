"""The compiled artifacts: every kernel built for sm_90a, the instructions we meant in
its SASS, resource use from ptxas -v, and the lazy driver of pykernels._C."""
import pytest
import torch

from pykernels.runtime import artifacts, kernel_build, sass
from pykernels.runtime.executors import gpu_unavailable_reason, run_cuda
from pykernels.cuda import quant as cq

QUANT = {"quant_per_token": "pk_quant_per_token", "quant_per_block": "pk_quant_per_block"}


def test_manifest_lists_every_source():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    built = artifacts.manifest()["kernels"]
    expected = {name for name, _, _ in kernel_build.discover(root)}
    assert expected and expected == set(built)
    assert artifacts.manifest()["arch"] == "sm_90a"
    for name in built:
        assert artifacts.cubin_path(name).read_bytes()[:4] == b"\x7fELF"
        assert ".target sm_90a" in artifacts.ptx_text(name)


@pytest.mark.parametrize("module,function", QUANT.items())
def test_quant_sass_has_the_intended_instructions(module, function):
    ops = sass.opcodes(sass.sass(module))
    # e4m3 conversion with saturation, two values per instruction
    assert any(op.startswith("F2FP.SATFINITE.E4M3.F32.PACK_AB") for op in ops), ops
    assert ops["SHFL.BFLY"] == 5                     # butterfly amax over 32 lanes
    assert any(op.startswith("STG.E.U8") for op in ops)
    assert not any(op.startswith(("STL", "LDL")) for op in ops), "local memory used"
    if module == "quant_per_block":
        assert any(op.startswith("BAR.SYNC") for op in ops)
        assert any(op.startswith("STS") for op in ops) and any(op.startswith("LDS") for op in ops)


@pytest.mark.parametrize("module,function", QUANT.items())
def test_quant_resources(module, function):
    r = artifacts.resources(module, function)
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack_bytes"] == 0
    assert 0 < r["registers"] <= 40          # small enough for full occupancy (64 warps/SM)
    assert r["shared_bytes"] == (32 if module == "quant_per_block" else 0)


def test_parse_ptxas_log():
    text = """ptxas info    : Compiling entry function 'kern_a' for 'sm_90a'
ptxas info    : Function properties for kern_a
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 1024 bytes smem
ptxas info    : Compiling entry function 'kern_b' for 'sm_90a'
ptxas info    : Function properties for kern_b
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers
"""
    f = kernel_build.parse_ptxas_log(text)
    assert f["kern_a"] == {"registers": 168, "barriers": 1, "shared_bytes": 1024, "stack_bytes": 8,
                           "spill_stores": 4, "spill_loads": 12}
    assert f["kern_b"]["registers"] == 12 and f["kern_b"]["shared_bytes"] == 0


def test_sass_opcode_parser():
    listing = """        /*0090*/                   F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C R16, R16, R17, RZ ;
        /*00a0*/              @!P5 STG.E.U8 desc[UR6][R10.64], R7 ;
        /*00b0*/               @P1 LDG.E.U16 R0, desc[UR6][R14.64] ;"""
    ops = sass.opcodes(listing)
    assert ops == {"F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C": 1, "STG.E.U8": 1, "LDG.E.U16": 1}


def test_extension_imports_without_a_driver():
    from pykernels import _C
    assert isinstance(_C.driver_available(), bool)
    assert _C.TENSOR_MAP_BYTES == 128
    if not _C.driver_available():
        assert "libcuda" in _C.driver_error() or "cuInit" in _C.driver_error()
        with pytest.raises(RuntimeError, match="no usable CUDA driver"):
            _C.device_count()


def test_cuda_backend_without_gpu_raises_clearly():
    if gpu_unavailable_reason() == "":
        pytest.skip("a GPU is present: the error path cannot be exercised")
    x = torch.randn(4, 128)
    plan = cq.per_token_plan(x, torch.empty(4, 128, dtype=torch.float8_e4m3fn), torch.empty(4, 1))
    with pytest.raises(RuntimeError, match="'cuda' backend needs an NVIDIA GPU"):
        run_cuda(plan)


def test_plan_geometry():
    x = torch.randn(130, 300, dtype=torch.bfloat16)
    p = cq.per_token_plan(x, x, x)  # outputs only appear as pointers here
    assert p.grid == ((130 * 3 + 3) // 4, 1, 1) and p.block == (128, 1, 1)
    assert [a.value for a in p.args[3:]] == [130, 300, 3, 300, 1]
    p = cq.per_block_plan(x.float(), x, x)
    assert p.grid == (2, 3, 1) and p.block == (256, 1, 1)
    assert [a.value for a in p.args[3:]] == [130, 300, 3, 300, 0]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 128), (7, 200), (129, 384), (300, 1000)])
def test_cuda_quant_matches_reference_bits(shape, dtype, seed):
    import pykernels as pk
    x = (torch.randn(*shape, device="cuda") * 3).to(dtype)
    for op in ("per_token_cast_to_fp8", "per_block_cast_to_fp8"):
        q, sf = getattr(pk, op)(x, backend="cuda")
        rq, rsf = getattr(pk, op)(x.cpu(), backend="reference")
        assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8)), op
        assert torch.equal(sf.cpu(), rsf), op
