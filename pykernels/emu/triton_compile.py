"""Compile Triton kernels to sm_90a PTX on a machine without a GPU, for the emulator.

Triton decides between its interpreter and its compiler when `triton.language` is first
imported (TRITON_INTERPRET), and a process may have chosen the interpreter (the user, or
this repository's tests on CPU machines). So compilation runs in a child process with
TRITON_INTERPRET=0; the result carries what
`launch_triton` needs (PTX, kernel name, warps, shared memory, cluster, scratch sizes).
"""
import dataclasses
import json
import os
import subprocess
import sys

_CHILD = r"""
import importlib, json, sys
spec = json.loads(sys.argv[1])
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
mod = importlib.import_module(spec["module"])
fn = getattr(mod, spec["function"])
if not isinstance(fn, triton.runtime.jit.JITFunction):
    fn = triton.runtime.jit.JITFunction(fn)
sig = dict(spec["signature"])
for k in spec["constexprs"]:
    sig[k] = "constexpr"
c = triton.compile(ASTSource(fn, sig, spec["constexprs"]), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]))
md = c.metadata
print(json.dumps({"ptx": c.asm["ptx"], "name": md.name, "num_warps": md.num_warps, "shared": md.shared,
                  "cluster_dims": list(getattr(md, "cluster_dims", (1, 1, 1)) or (1, 1, 1)),
                  "global_scratch_size": getattr(md, "global_scratch_size", 0) or 0,
                  "global_scratch_align": getattr(md, "global_scratch_align", 1) or 1,
                  "profile_scratch_size": getattr(md, "profile_scratch_size", 0) or 0,
                  "tensordesc_meta": getattr(md, "tensordesc_meta", None)}))
"""


@dataclasses.dataclass
class CompiledPTX:
    """What a Triton CompiledKernel offers the emulator (asm["ptx"] and metadata)."""
    ptx: str
    name: str
    num_warps: int
    shared: int
    cluster_dims: tuple
    global_scratch_size: int = 0
    global_scratch_align: int = 1
    profile_scratch_size: int = 0
    tensordesc_meta: list = None     # per TensorDescriptor argument: swizzle, elem_size, block_size ...

    @property
    def asm(self):
        return {"ptx": self.ptx}

    @property
    def metadata(self):
        return self


def compile_triton(module: str, function: str, signature: dict, constexprs: dict,
                   num_warps: int = 4, num_stages: int = 3) -> CompiledPTX:
    """Compile `module.function` (a @triton.jit or plain function) for sm_90a.

    signature: argument name -> Triton type string ("*fp32", "i32", ...) for the
    runtime arguments; constexprs: name -> value. Returns CompiledPTX.
    """
    spec = json.dumps({"module": module, "function": function, "signature": signature,
                       "constexprs": constexprs, "num_warps": num_warps, "num_stages": num_stages})
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _CHILD, spec], capture_output=True, text=True, env=env,
                          cwd=os.getcwd())
    if proc.returncode != 0:
        raise RuntimeError(f"triton.compile of {module}.{function} failed:\n{proc.stderr[-4000:]}")
    d = json.loads(proc.stdout.strip().splitlines()[-1])
    d["cluster_dims"] = tuple(d["cluster_dims"])
    return CompiledPTX(**d)
