"""Accuracy metrics used by every test and by the main job."""
import torch

from .runtime.arrays import dlpack_io


@dlpack_io
def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity metric: ``1 - 2*sum(x*y) / sum(x*x + y*y)`` in float64.

    0 for identical tensors, ~1 for unrelated ones. Shapes must match; any dtype.
    """
    if x.shape != y.shape:
        raise ValueError(f"calc_diff: shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    x = x.detach().to("cpu", torch.float64)
    y = y.detach().to("cpu", torch.float64)
    denom = (x * x + y * y).sum()
    if denom == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denom)


@dlpack_io
def rel_error(x: torch.Tensor, y: torch.Tensor) -> float:
    """Relative Frobenius error ``||x - y|| / ||y||`` in float64 (y is the reference)."""
    if x.shape != y.shape:
        raise ValueError(f"rel_error: shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    x = x.detach().to("cpu", torch.float64)
    y = y.detach().to("cpu", torch.float64)
    ny = torch.linalg.vector_norm(y)
    nd = torch.linalg.vector_norm(x - y)
    if ny == 0:
        return float(nd)
    return float(nd / ny)
