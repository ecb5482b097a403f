"""Numeric constants shared by every implementation of FP8 block scaling."""
from ..runtime.hardware import SCALE_BLOCK as BLOCK  # noqa: F401  (1x128 per token, 128x128 per block)

FP8_E4M3_MAX = 448.0     # largest finite float8_e4m3fn
FP8_SCALE_FLOOR = 1e-4   # amax floor so all-zero groups get a finite, non-zero scale
