"""bench/peers/gpu_gemm.py: DeepGEMM's kernel prepared here (PTX + sm_90a cubin), launched
on a GPU with parameters packed as its PTX entry declares them."""
import json

import pytest
import torch

from bench.peers import gpu_gemm

_ENTRY = """
.visible .entry k(
	.param .u64 .ptr .global .align 1 k_param_0,
	.param .u64 k_param_1,
	.param .u32 k_param_2,
	.param .align 64 .b8 k_param_3[128]
)
{ ret; }
"""


def test_pack_params_sizes_follow_the_ptx_entry():
    t = torch.empty(4, dtype=torch.float32)
    params = gpu_gemm.pack_params(_ENTRY, "k", [t, 0, 77, 5])
    assert [len(p) for p in params] == [8, 8, 4, 128]
    assert int.from_bytes(params[0], "little") == t.data_ptr()
    assert int.from_bytes(params[2], "little") == 77


def test_pack_params_rejects_a_wrong_argument_count():
    with pytest.raises(ValueError, match="declares 4 parameters, got 3"):
        gpu_gemm.pack_params(_ENTRY, "k", [0, 0, 0])


def test_pack_params_rejects_a_value_that_does_not_fit():
    with pytest.raises(OverflowError):
        gpu_gemm.pack_params(_ENTRY, "k", [0, 0, 1 << 40, 0])


def test_prepare_writes_cubins_and_a_manifest(deep_gemm_headers, tmp_path):
    manifest = gpu_gemm.prepare(tmp_path, num_sms=132, quick=True, configs_per_shape=1)
    assert json.loads((tmp_path / gpu_gemm.MANIFEST).read_text()) == manifest
    shapes = {(e["m"], e["n"], e["k"]) for e in manifest["entries"]}
    assert shapes == set(gpu_gemm.shapes(quick=True))
    for e in manifest["entries"]:
        assert (tmp_path / e["cubin"]).read_bytes()[:4] == b"\x7fELF"
        assert e["config"]["num_sms"] == 132 and e["entry"] in (tmp_path / e["ptx"]).read_text()


@pytest.mark.gpu
def test_deepgemm_and_ours_agree_on_the_gpu(deep_gemm_headers, tmp_path):
    count = torch.cuda.get_device_properties(0).multi_processor_count
    gpu_gemm.prepare(tmp_path, num_sms=count, quick=True, configs_per_shape=1)
    rows = gpu_gemm.run(tmp_path, runs=3)
    assert rows and all(r["seconds"] and r["calc_diff"] < gpu_gemm.CHECK_DIFF for r in rows), rows
