"""The layering of docs/architecture.md, checked: imports go down the table, never up."""
import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "pykernels"
API = ("pykernels.gemm", "pykernels.mla", "pykernels.quant", "pykernels.ops", "pykernels.registry",
       "pykernels.selfcheck")


def _imports(path: Path, top_level_only: bool):
    """Absolute names of the pykernels modules `path` imports."""
    tree = ast.parse(path.read_text())
    package = ".".join(("pykernels",) + path.relative_to(PKG).with_suffix("").parts[:-1])
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield name
            for alias in node.names:
                yield f"{name}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name


def _violations(folders, forbidden, top_level_only):
    bad = []
    for folder in folders:
        for path in sorted((PKG / folder).rglob("*.py")):
            for name in _imports(path, top_level_only):
                if any(name == f or name.startswith(f + ".") for f in forbidden):
                    bad.append(f"{path.relative_to(PKG.parent)} imports {name}")
    return sorted(set(bad))


def test_backends_and_runtime_never_import_the_api_layers():
    assert _violations(("reference", "triton", "cuda", "runtime", "emu"), API, top_level_only=False) == []


# Compiling Triton for sm_90 on a CPU exists to feed the emulator (tests, resource checks):
# it is the one backend module that may load it.
EMULATOR_FEEDERS = ["pykernels/triton/sm90_compile.py imports pykernels.emu.triton_compile",
                    "pykernels/triton/sm90_compile.py imports pykernels.emu.triton_compile.CompiledPTX"]


def test_the_runtime_and_backends_do_not_load_the_emulator_at_import():
    found = _violations(("runtime", "cuda", "triton", "reference"), ("pykernels.emu",), top_level_only=True)
    assert found == EMULATOR_FEEDERS


def test_gpu_path_modules_import_without_the_emulator():
    code = ("import sys, pykernels.gemm, pykernels.mla, pykernels.quant, pykernels.cuda.gemm, pykernels.cuda.mla; "
            "print(sorted(m for m in sys.modules if m.startswith('pykernels.emu')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
