"""What Triton's launcher compiles for a launch, and compiling that for sm_90 on a CPU.

A GPU launch `kernel[grid](*args, **constexprs)` does not compile the kernel's plain
signature: Triton's launcher specializes it on the argument values
(`native_specialize_impl` in Triton 3.6-3.8):
- a tensor argument whose address is a multiple of 16 gets `tt.divisibility 16`;
- an integer argument whose value is a multiple of 16 (0 included) gets `tt.divisibility
  16`; an integer equal to 1 becomes the constexpr 1 (dropped from the kernel's parameters);
- integers are i32 when they fit, i64 otherwise; floats are fp32.
Without the alignment attributes the loads compile to scalar accesses and the code (and
its registers, spills and pipelining) is not what the GPU runs. `specialize` reproduces
that from the launch's values, so each kernel family's `sm90_compile_specs()` can give
the exact compilation its GPU launches get, and a CPU machine can compile it
(`compile_sm90`, in sm90_compile.py: triton.compile in a child process with TRITON_INTERPRET=0, as this
process may run Triton's interpreter) for ptxas's resource counts and for the PTX
emulator (`pykernels.emu.launch_triton`).
"""
import dataclasses

import torch


_TT_DTYPE = {torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5", torch.bfloat16: "bf16",
             torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64", torch.int8: "i8",
             torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1"}


def launch_attrs(fn, sig, aligned_ints=(), unaligned_ptrs=()):
    """The launcher's alignment specialization as triton.compile's `attrs`: tt.divisibility
    16 on every pointer argument of `sig` (name -> Triton type) except `unaligned_ptrs`, and
    on the integer arguments named in `aligned_ints` (values that are multiples of 16).
    Keys are argument positions in fn.arg_names."""
    return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
            if n in sig and ((sig[n].startswith("*") and n not in unaligned_ptrs) or n in aligned_ints)}


@dataclasses.dataclass
class LaunchSpec:
    """One compiled variant of a kernel, as a GPU launch gets it."""
    label: str               # what launch it stands for (shapes, layout)
    module: str              # the kernel's module and attribute name
    kernel: str
    signature: dict          # runtime argument name -> Triton type
    constexprs: dict         # constexprs, with the launcher's integer-1 specializations
    attrs: dict              # launch_attrs
    num_warps: int
    num_stages: int
    grid: tuple = (1, 1, 1)
    args: list = None        # runtime arguments in order, constexprs dropped (launch_triton's)

    def key(self):
        """Identity of the compilation (launches with equal keys share one binary)."""
        return (self.module, self.kernel, tuple(self.signature.items()), tuple(sorted(self.constexprs.items())),
                tuple(sorted(self.attrs)), self.num_warps, self.num_stages)

    def to_json(self):
        return dict(label=self.label, module=self.module, kernel=self.kernel, signature=self.signature,
                    constexprs=self.constexprs, attrs=[k[0] for k in self.attrs],
                    num_warps=self.num_warps, num_stages=self.num_stages)


def specialize(fn, args: dict, constexprs: dict):
    """(signature, constexprs, attrs, runtime args) that Triton's launcher compiles and
    passes for `fn[grid](**args, **constexprs)`. args: runtime argument name -> value
    (tensors, including meta tensors, which count as 16-byte aligned; ints; floats)."""
    sig, cx, aligned, unaligned, runtime = {}, dict(constexprs), [], [], []
    for name in fn.arg_names:
        if name in constexprs:
            continue
        v = args[name]
        if isinstance(v, torch.Tensor):
            sig[name] = "*" + _TT_DTYPE[v.dtype]
            if v.device.type != "meta" and v.data_ptr() % 16:
                unaligned.append(name)
        elif isinstance(v, bool):
            sig[name] = "u1"
        elif isinstance(v, int):
            if v == 1:
                cx[name] = 1
                continue
            sig[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            if v % 16 == 0:
                aligned.append(name)
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: no launcher specialization known for {type(v).__name__}")
        runtime.append(v)
    return sig, cx, launch_attrs(fn, sig, aligned, unaligned), runtime


def launch_spec(label, fn, grid, args: dict, constexprs: dict, num_warps: int, num_stages: int) -> LaunchSpec:
    """LaunchSpec of `fn[grid](**args, **constexprs, num_warps=..., num_stages=...)`."""
    sig, cx, attrs, runtime = specialize(fn, args, constexprs)
    grid = tuple(grid) + (1,) * (3 - len(grid))
    return LaunchSpec(label, fn.fn.__module__, fn.fn.__name__, sig, cx, attrs, num_warps, num_stages, grid, runtime)


# A launch description, as the kernel families' *_launch_args build it (one builder serves
# the real launch and its compile spec): (kernel, grid, runtime args by name, constexprs,
# options), or None when there is nothing to compute.

def run_launch(launch) -> None:
    """Launch a launch description (nothing for None)."""
    if launch is not None:
        kernel, grid, args, constexprs, options = launch
        kernel[grid](*args.values(), **constexprs, **options)


def spec_of(label, launch) -> LaunchSpec:
    """The LaunchSpec of a launch description."""
    kernel, grid, args, constexprs, options = launch
    return launch_spec(label, kernel, grid, args, constexprs, **options)


def __getattr__(name):
    # compile_sm90 / Compiled build on the emulator's CompiledPTX: loaded on demand, so the
    # Triton kernels' launch path never imports the emulator.
    if name in ("compile_sm90", "Compiled"):
        from . import sm90_compile
        return getattr(sm90_compile, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["launch_attrs", "specialize", "LaunchSpec", "launch_spec", "run_launch", "spec_of"]
