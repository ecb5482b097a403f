"""Hardware facts every layer shares, written once: the scale block, Hopper's per-block
shared-memory limit, the TMA's 16-byte alignment, the SM count (the device's when there
is one, capped by `set_num_sms`), and `cdiv`.

Numbers are H100/H800/H200 SXM facts (CUDA C Programming Guide, compute capability 9.0:
227 KB of dynamic shared memory per block after opting in; 132 SMs on H100/H200 SXM).
"""
import functools

import torch

from .validate import check_int

SCALE_BLOCK = 128                 # FP8 scaling granularity: 1x128 per token, 128x128 per block
SMEM_PER_BLOCK = 227 * 1024       # dynamic shared memory per block after opting in (sm_90)
SMEM_PER_SM = 228 * 1024          # shared memory of one SM, shared by its resident CTAs (sm_90)
DEFAULT_NUM_SMS = 132             # H100/H200 SXM; used when no GPU is visible (emulator, planning)
WARP_SIZE = 32
TMA_ALIGNMENT_BYTES = 16          # TMA global addresses and strides are multiples of 16 bytes


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative ints."""
    return (a + b - 1) // b


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def tma_aligned_size(mn: int, element_size: int) -> int:
    """mn rounded up so that mn elements of element_size bytes span a multiple of 16 bytes
    (the padded row count of a column-major scale tensor that TMA loads)."""
    return round_up(mn, TMA_ALIGNMENT_BYTES // element_size)


@functools.lru_cache(maxsize=None)
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_sms(device=None) -> int:
    """The SM count of `device` (a CUDA device), or DEFAULT_NUM_SMS for CPU tensors / no GPU."""
    if device is not None and torch.device(device).type == "cuda":
        d = torch.device(device)
        return _device_sms(d.index if d.index is not None else torch.cuda.current_device())
    return DEFAULT_NUM_SMS


_sms_cap = 0                      # set_num_sms: 0 = no cap


def num_sms(device=None) -> int:
    """SMs the kernels may use on `device`: its SM count (device_sms), capped by set_num_sms.
    The GEMMs' persistent grid and config heuristic and the MLA split schedule read it."""
    sms = device_sms(device)
    return min(sms, _sms_cap) if _sms_cap else sms


def _current_device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def set_num_sms(num_sms: int) -> None:
    """Cap the SMs every pykernels kernel may use, process-wide (DeepGEMM's set_num_sms):
    num_sms in [1, SMs of the current device] (DEFAULT_NUM_SMS without a GPU); 0 removes
    the cap. Launch plans and MLA schedules made afterwards use it."""
    global _sms_cap
    _sms_cap = check_int("num_sms", num_sms, lo=0, hi=device_sms(_current_device()))


def get_num_sms() -> int:
    """The SMs the kernels may use on the current device (DEFAULT_NUM_SMS without a GPU):
    the set_num_sms cap, or the device's SM count when none is set."""
    return num_sms(_current_device())
