"""torch.library custom ops for every public operation, with fake implementations so
torch.compile (fullgraph) and CUDA graphs see them as opaque, shape-known calls.

The public functions in pykernels.quant / pykernels.gemm validate their inputs and
resolve the backend, then call these ops; each op dispatches on the backend name to
the implementation table below.
"""
import torch

from .. import reference as R


def _cuda():
    from .. import cuda as C
    return C


def _triton():
    from .. import triton as T  # imported lazily: sets TRITON_INTERPRET on CPU machines
    return T


# op name -> backend -> implementation. New backends register here (one line each).
IMPLS = {
    "per_token_cast_to_fp8": {
        "reference": R.per_token_cast_to_fp8,
        "triton": lambda x: _triton().per_token_cast_to_fp8(x),
        "cuda": lambda x: _cuda().quant.per_token_cast_to_fp8(x, "cuda"),
        "emu": lambda x: _cuda().quant.per_token_cast_to_fp8(x, "emu"),
    },
    "per_block_cast_to_fp8": {
        "reference": R.per_block_cast_to_fp8,
        "triton": lambda x: _triton().per_block_cast_to_fp8(x),
        "cuda": lambda x: _cuda().quant.per_block_cast_to_fp8(x, "cuda"),
        "emu": lambda x: _cuda().quant.per_block_cast_to_fp8(x, "emu"),
    },
    "fp8_gemm_nt": {
        "reference": R.fp8_gemm_nt,
        "triton": lambda *a: _triton().fp8_gemm_nt(*a),
        "cuda": lambda *a: _cuda().gemm.fp8_gemm_nt(*a, "cuda"),
        "emu": lambda *a: _cuda().gemm.fp8_gemm_nt(*a, "emu"),
    },
    "m_grouped_fp8_gemm_nt_contiguous": {
        "reference": R.m_grouped_fp8_gemm_nt_contiguous,
        "triton": lambda *a: _triton().m_grouped_fp8_gemm_nt_contiguous(*a),
        "cuda": lambda *a: _cuda().gemm.m_grouped_fp8_gemm_nt_contiguous(*a, "cuda"),
        "emu": lambda *a: _cuda().gemm.m_grouped_fp8_gemm_nt_contiguous(*a, "emu"),
    },
    "m_grouped_fp8_gemm_nt_masked": {
        "reference": R.m_grouped_fp8_gemm_nt_masked,
        "triton": lambda *a: _triton().m_grouped_fp8_gemm_nt_masked(*a),
        "cuda": lambda *a, expected_m=None: _cuda().gemm.m_grouped_fp8_gemm_nt_masked(*a, "cuda", expected_m),
        "emu": lambda *a, expected_m=None: _cuda().gemm.m_grouped_fp8_gemm_nt_masked(*a, "emu", expected_m),
    },
}


# Backends whose masked GEMM takes the expected_m hint (keyword) for its tile choice.
_TAKES_EXPECTED_M = ("cuda", "emu")


def _ceil128(v: int) -> int:
    return (v + 127) // 128


@torch.library.custom_op("pykernels::per_token_cast_to_fp8", mutates_args=())
def per_token_cast_to_fp8_op(x: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return IMPLS["per_token_cast_to_fp8"][backend](x)


@per_token_cast_to_fp8_op.register_fake
def _(x, backend):
    m, k = x.shape
    return (x.new_empty((m, k), dtype=torch.float8_e4m3fn),
            x.new_empty((m, _ceil128(k)), dtype=torch.float32))


@torch.library.custom_op("pykernels::per_block_cast_to_fp8", mutates_args=())
def per_block_cast_to_fp8_op(x: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return IMPLS["per_block_cast_to_fp8"][backend](x)


@per_block_cast_to_fp8_op.register_fake
def _(x, backend):
    m, n = x.shape
    return (x.new_empty((m, n), dtype=torch.float8_e4m3fn),
            x.new_empty((_ceil128(m), _ceil128(n)), dtype=torch.float32))


@torch.library.custom_op("pykernels::fp8_gemm_nt", mutates_args=("out",))
def fp8_gemm_nt_op(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor,
                   out: torch.Tensor, backend: str) -> None:
    IMPLS["fp8_gemm_nt"][backend](a, sfa, b, sfb, out)


@fp8_gemm_nt_op.register_fake
def _(a, sfa, b, sfb, out, backend):
    return None


@torch.library.custom_op("pykernels::m_grouped_fp8_gemm_nt_contiguous", mutates_args=("out",))
def m_grouped_contiguous_op(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor,
                            out: torch.Tensor, m_indices: torch.Tensor, backend: str) -> None:
    IMPLS["m_grouped_fp8_gemm_nt_contiguous"][backend](a, sfa, b, sfb, m_indices, out)


@m_grouped_contiguous_op.register_fake
def _(a, sfa, b, sfb, out, m_indices, backend):
    return None


@torch.library.custom_op("pykernels::m_grouped_fp8_gemm_nt_masked", mutates_args=("out",))
def m_grouped_masked_op(a: torch.Tensor, sfa: torch.Tensor, b: torch.Tensor, sfb: torch.Tensor,
                        out: torch.Tensor, masked_m: torch.Tensor, expected_m: int, backend: str) -> None:
    impl = IMPLS["m_grouped_fp8_gemm_nt_masked"][backend]
    if backend in _TAKES_EXPECTED_M:   # the tile-choice hint; other backends do not use it
        impl(a, sfa, b, sfb, masked_m, out, expected_m=expected_m)
    else:
        impl(a, sfa, b, sfb, masked_m, out)


@m_grouped_masked_op.register_fake
def _(a, sfa, b, sfb, out, masked_m, expected_m, backend):
    return None
