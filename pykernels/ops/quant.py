"""FP8 (e4m3) quantization ops: problem, backends, custom ops.

per_token_cast_to_fp8: x [m, k] -> (e4m3 [m, k], f32 [m, ceil(k/128)]);
per_block_cast_to_fp8: x [m, n] -> (e4m3 [m, n], f32 [ceil(m/128), ceil(n/128)]).
"""
import dataclasses

import torch

from .. import registry
from ..reference import quant as RQ
from ..runtime import validate as V
from ..runtime.hardware import SCALE_BLOCK, cdiv
from . import backends as B

FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)
_KERNEL_MODULE = {"per_token_cast_to_fp8": "quant_per_token", "per_block_cast_to_fp8": "quant_per_block"}


@dataclasses.dataclass(frozen=True)
class QuantProblem:
    op: str
    x: torch.Tensor

    @property
    def device(self):
        return self.x.device

    def scale_shape(self):
        m, k = self.x.shape
        if self.op == "per_token_cast_to_fp8":
            return (m, cdiv(k, SCALE_BLOCK))
        return (cdiv(m, SCALE_BLOCK), cdiv(k, SCALE_BLOCK))

    def describe(self) -> str:
        return f"x {list(self.x.shape)} {str(self.x.dtype).replace('torch.', '')} on {self.device}"


def problem(op: str, x) -> QuantProblem:
    """Validate x: a 2-D float32/bfloat16/float16 tensor with unit stride along its last dim."""
    x = V.as_tensor("x", x)
    V.check_rank("x", x, 2)
    V.check_dtype("x", x, *FLOAT_INPUTS)
    V.check_inner_contiguous("x", x)
    return QuantProblem(op, x)


def _outputs(p: QuantProblem):
    return (torch.empty(p.x.shape, dtype=torch.float8_e4m3fn, device=p.device),
            torch.empty(p.scale_shape(), dtype=torch.float32, device=p.device))


def _empty_or(fn):
    """Empty inputs give empty outputs on every backend, without a launch."""
    def run(p, *executor):
        return _outputs(p) if p.x.numel() == 0 else fn(p, *executor)
    return run


def _register(op: str):
    o = registry.op(op, lambda x: problem(op, x))
    for name in ("cuda", "emu"):
        o.add(B.kernel(name, _KERNEL_MODULE[op], _empty_or(lambda p, ex: _kernel(op, p, ex))))
    o.add(B.triton(_empty_or(lambda p: getattr(_triton(), op)(p.x))))
    o.add(B.reference(_empty_or(lambda p: getattr(RQ, op)(p.x))))
    return o


def _kernel(op, p, executor):
    from ..cuda import quant as CQ
    return getattr(CQ, op)(p.x, executor)


def _triton():
    from .. import triton as T
    return T


PER_TOKEN = _register("per_token_cast_to_fp8")
PER_BLOCK = _register("per_block_cast_to_fp8")


def per_token_cast_to_fp8_body(x: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return PER_TOKEN(problem("per_token_cast_to_fp8", x), backend)


per_token_cast_to_fp8_op = torch.library.custom_op("pykernels::per_token_cast_to_fp8", mutates_args=())(
    per_token_cast_to_fp8_body)


@per_token_cast_to_fp8_op.register_fake
def _(x, backend):
    return _outputs(problem("per_token_cast_to_fp8", x))


def per_block_cast_to_fp8_body(x: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return PER_BLOCK(problem("per_block_cast_to_fp8", x), backend)


per_block_cast_to_fp8_op = torch.library.custom_op("pykernels::per_block_cast_to_fp8", mutates_args=())(
    per_block_cast_to_fp8_body)


@per_block_cast_to_fp8_op.register_fake
def _(x, backend):
    return _outputs(problem("per_block_cast_to_fp8", x))
