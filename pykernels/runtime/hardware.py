"""Hardware facts every layer shares, written once: the scale block, Hopper's per-block
shared-memory limit, the SM count (the device's when there is one), and `cdiv`.

Numbers are H100/H800/H200 SXM facts (CUDA C Programming Guide, compute capability 9.0:
227 KB of dynamic shared memory per block after opting in; 132 SMs on H100/H200 SXM).
"""
import functools

import torch

SCALE_BLOCK = 128                 # FP8 scaling granularity: 1x128 per token, 128x128 per block
SMEM_PER_BLOCK = 227 * 1024       # dynamic shared memory per block after opting in (sm_90)
DEFAULT_NUM_SMS = 132             # H100/H200 SXM; used when no GPU is visible (emulator, planning)
WARP_SIZE = 32


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative ints."""
    return (a + b - 1) // b


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


@functools.lru_cache(maxsize=None)
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device=None) -> int:
    """SM count of `device` (a CUDA device), or DEFAULT_NUM_SMS for CPU tensors / no GPU."""
    if device is not None and torch.device(device).type == "cuda":
        d = torch.device(device)
        return _device_sms(d.index if d.index is not None else torch.cuda.current_device())
    return DEFAULT_NUM_SMS
