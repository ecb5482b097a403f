"""Backend selection: "cuda" (hand-written kernel, GPU), "emu" (the same kernel on the
PTX emulator), "triton" (GPU, or the interpreter on CPU), "reference" (PyTorch)."""
import torch

BACKENDS = ("cuda", "emu", "triton", "reference")


def resolve(op: str, backend: str, device: torch.device, implemented: dict) -> str:
    """Pick the backend for `op` on `device`.

    implemented: backend name -> callable, for the backends this op has today.
    "auto" is "cuda" on a GPU when built, else "triton" on a GPU and "reference" on CPU.
    """
    if backend == "auto":
        if device.type == "cuda":
            backend = "cuda" if "cuda" in implemented else "triton"
        else:
            backend = "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {('auto',) + BACKENDS}, got {backend!r}")
    if backend not in implemented:
        raise ValueError(f"backend: {backend!r} is not available for {op} yet; "
                         f"available: {', '.join(sorted(implemented))}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend: 'cuda' runs on GPU tensors, got tensors on {device} "
                         "(use backend='emu' for the same kernel on the CPU emulator)")
    if backend == "emu" and device.type != "cpu":
        raise ValueError(f"backend: 'emu' runs on CPU tensors, got tensors on {device}")
    return backend
