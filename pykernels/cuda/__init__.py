"""Host side of the hand-written kernels (csrc/, ptx/): validation-free launch-plan
builders (inputs are validated by the public API) and the functions that run a plan on
the GPU ("cuda") or the emulator ("emu")."""
from . import gemm, quant  # noqa: F401
