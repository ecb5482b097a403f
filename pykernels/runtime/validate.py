"""Input validation shared by every public op: each error names the argument, what was
expected and what was given."""
import numbers

import torch
import torch._subclasses.fake_tensor


def as_tensor(name: str, x) -> torch.Tensor:
    """torch tensors pass through; any DLPack producer (numpy, CuPy, JAX...) is imported
    zero-copy with torch.from_dlpack."""
    if isinstance(x, torch.Tensor):
        return x
    if hasattr(x, "__dlpack__"):
        try:
            return torch.from_dlpack(x)
        except Exception as e:  # e.g. a dtype torch cannot represent
            raise TypeError(f"{name}: could not import DLPack tensor of type {type(x).__name__}: {e}") from e
    raise TypeError(f"{name}: expected a torch.Tensor or a DLPack-capable tensor, got {type(x).__name__}")


def check_dtype(name: str, t: torch.Tensor, *dtypes: torch.dtype) -> None:
    if t.dtype not in dtypes:
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype {want}, got {str(t.dtype).replace('torch.', '')}")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    """shape entries of None match any size."""
    ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")


def check_rank(name: str, t: torch.Tensor, rank: int) -> None:
    if t.dim() != rank:
        raise ValueError(f"{name}: expected a {rank}-D tensor, got {t.dim()}-D with shape {list(t.shape)}")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous (row-major) tensor, got strides {list(t.stride())}")


def check_inner_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected unit stride in the last dimension, got strides {list(t.stride())}")


def check_scale_layout(name: str, sf: torch.Tensor) -> None:
    """Scales may be row-major contiguous, or column-major with the row dimension padded
    to a multiple of 4 floats (16 bytes, TMA-aligned) as DeepGEMM produces them."""
    if sf.is_contiguous():
        return
    rows = sf.shape[-2]
    col_major = sf.stride(-2) == 1 and sf.stride(-1) >= rows and sf.stride(-1) % 4 == 0
    if not col_major:
        raise ValueError(
            f"{name}: expected row-major contiguous scales or column-major TMA-aligned scales "
            f"(stride(-2) == 1, stride(-1) a multiple of 4 >= {rows}); got strides {list(sf.stride())} "
            "(use pykernels.get_col_major_tma_aligned_tensor)")


def check_aligned(name: str, t: torch.Tensor, nbytes: int, why: str) -> None:
    """t's data pointer a multiple of nbytes (a view at a storage offset may not be); why:
    what needs it. Tensors without elements or data (meta) pass."""
    if t.numel() and t.device.type != "meta" and t.data_ptr() % nbytes:
        raise ValueError(f"{name}: expected a {nbytes}-byte aligned data pointer ({why}), got {t.data_ptr():#x} "
                         f"(storage offset {t.storage_offset()} elements; .clone() gives an aligned copy)")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {n: t.device for n, t in tensors.items()}
    first = next(iter(devices.values()))
    for n, d in devices.items():
        if d != first:
            listing = ", ".join(f"{k}={v}" for k, v in devices.items())
            raise ValueError(f"{n}: all tensors must be on one device, got {listing}")
    return first


def check_multiple(name: str, value: int, multiple: int) -> None:
    if value % multiple:
        raise ValueError(f"{name}: expected a multiple of {multiple}, got {value}")


def _byte_range(t: torch.Tensor):
    if t.numel() == 0:
        return None
    lo = hi = t.storage_offset()
    for size, stride in zip(t.shape, t.stride()):
        (lo, hi) = (lo + (size - 1) * stride, hi) if stride < 0 else (lo, hi + (size - 1) * stride)
    eb = t.element_size()
    return lo * eb, (hi + 1) * eb


def check_no_self_overlap(name: str, t: torch.Tensor) -> None:
    """`t` (an output) must not hold one memory location twice: a dimension of stride 0
    (an expand()ed or broadcast view) would have several kernel threads store to it."""
    for dim, (size, stride) in enumerate(zip(t.shape, t.stride())):
        if size > 1 and stride == 0:
            raise ValueError(f"{name}: expected memory of its own for each element (it is written), got stride 0 "
                             f"in dim {dim} (an expanded view) with shape {list(t.shape)} and strides "
                             f"{list(t.stride())}")


def check_no_overlap(name: str, t: torch.Tensor, **inputs: torch.Tensor) -> None:
    """`t` (an output) must not share memory with itself (check_no_self_overlap) or with any
    of `inputs` (None entries skipped)."""
    check_no_self_overlap(name, t)
    r = _byte_range(t)
    if r is None:
        return
    base = t.untyped_storage().data_ptr()
    for other_name, o in inputs.items():
        if o is None or o.device != t.device:
            continue
        ro = _byte_range(o)
        if ro is None or o.untyped_storage().data_ptr() != base:
            continue
        if r[0] < ro[1] and ro[0] < r[1]:
            raise ValueError(f"{name}: expected memory of its own, got a tensor overlapping {other_name}")


def check_int(name: str, v, lo: int = None, hi: int = None) -> int:
    """A Python int (not bool) in [lo, hi]; returns it."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__} {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        if hi is None:
            want = f">= {lo}"
        elif lo is None:
            want = f"<= {hi}"
        else:
            want = f"in [{lo}, {hi}]"
        raise ValueError(f"{name}: expected an int {want}, got {v}")
    return int(v)


def is_fake(t: torch.Tensor) -> bool:
    """True for tensors without data (torch.compile's fake / meta tensors): value and
    pointer checks are skipped for them and made when the op runs."""
    return t.device.type == "meta" or torch._subclasses.fake_tensor.is_fake(t)
