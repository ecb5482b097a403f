"""Argument checks and TMA facts shared by the peer launchers (errors name the argument)."""
import torch


def swizzle_mode(row_bytes: int) -> int:
    """Largest TMA swizzle (128, 64, 32 bytes) that divides a tile row; 0 for none."""
    return next((s for s in (128, 64, 32) if row_bytes % s == 0), 0)


def check_tensor(name, t, dtype, shape, device="cpu"):
    """t is a `dtype` tensor of `shape` on `device` (the emulator's launches: the CPU)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")
    if t.device != torch.device(device):
        raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")


def check_tma_rows(name, t):
    if t.stride(-1) != 1 or (t.dim() > 1 and (t.stride(-2) * t.element_size()) % 16):
        raise ValueError(f"{name}: TMA needs contiguous rows whose stride is a multiple of 16 bytes, "
                         f"got strides {t.stride()} of {t.element_size()}-byte elements")
    if t.data_ptr() % 16:
        raise ValueError(f"{name}: TMA needs a 16-byte aligned start address")
