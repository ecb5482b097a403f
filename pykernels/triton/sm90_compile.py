"""compile_sm90: Triton kernels compiled for sm_90a on a machine without a GPU, in child
processes with TRITON_INTERPRET=0 (this process may run Triton's interpreter), from the
LaunchSpecs of pykernels.triton.sm90; the results carry the PTX the emulator runs
(pykernels.emu.launch_triton) and ptxas's resource counts."""
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

from ..emu.triton_compile import CompiledPTX

_CHILD = r"""
import importlib, json, re, subprocess, sys, tempfile
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
specs = json.load(open(sys.argv[1]))
res = []
for s in specs:
    fn = getattr(importlib.import_module(s["module"]), s["kernel"])
    sig = dict(s["signature"], **{k: "constexpr" for k in s["constexprs"]})
    attrs = {(i,): [["tt.divisibility", 16]] for i in s["attrs"]}
    c = triton.compile(ASTSource(fn, sig, s["constexprs"], attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=s["num_warps"], num_stages=s["num_stages"]))
    md = c.metadata
    # ptxas's register count and stack frame (local memory: only spills use it here),
    # read back from the cubin.
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(c.asm["cubin"])
        f.flush()
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    regs, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    res.append(dict(ptx=c.asm["ptx"], name=md.name, num_warps=md.num_warps, shared=md.shared,
                    cluster_dims=list(getattr(md, "cluster_dims", (1, 1, 1)) or (1, 1, 1)),
                    global_scratch_size=getattr(md, "global_scratch_size", 0) or 0,
                    global_scratch_align=getattr(md, "global_scratch_align", 1) or 1,
                    profile_scratch_size=getattr(md, "profile_scratch_size", 0) or 0,
                    tensordesc_meta=getattr(md, "tensordesc_meta", None), regs=regs, stack=stack))
json.dump(res, open(sys.argv[2], "w"))
"""


@dataclasses.dataclass
class Compiled(CompiledPTX):
    """compile_sm90's result: the fields pykernels.emu.launch_triton reads (CompiledPTX),
    plus ptxas's registers per thread and stack bytes per thread (spills)."""
    regs: int = 0
    stack: int = 0


def compile_sm90(specs, jobs: int = 1, timeout: float = 600):
    """Compile LaunchSpecs for sm_90a (TRITON_INTERPRET=0 child processes; no GPU needed).
    Returns one Compiled per spec (equal keys compiled once); `jobs` child processes."""
    unique = {}
    for s in specs:
        unique.setdefault(s.key(), s)
    todo = list(unique.values())
    chunks = [todo[i::max(1, jobs)] for i in range(max(1, jobs))]
    chunks = [c for c in chunks if c]
    env = dict(os.environ, TRITON_INTERPRET="0")
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for j, chunk in enumerate(chunks):
            src, dst = os.path.join(tmp, f"in{j}.json"), os.path.join(tmp, f"out{j}.json")
            with open(src, "w") as f:
                json.dump([s.to_json() for s in chunk], f)
            procs.append((chunk, dst, subprocess.Popen([sys.executable, "-c", _CHILD, src, dst], env=env,
                                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        done = {}
        for chunk, dst, p in procs:
            _, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise RuntimeError(f"triton.compile for sm_90 failed ({[s.label for s in chunk]}):\n{err[-4000:]}")
            with open(dst) as f:
                for s, r in zip(chunk, json.load(f)):
                    r["cluster_dims"] = tuple(r["cluster_dims"])
                    done[s.key()] = Compiled(**r)
    return [done[s.key()] for s in specs]
