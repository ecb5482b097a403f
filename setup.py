"""Build pykernels: the host extension pykernels._C and every sm_90a kernel.

No GPU is needed to build. nvcc (CUDA 13; NVIDIA's pip wheels pinned in pyproject.toml and
requirements-cpu.txt, or a system toolkit: see find_cuda_home and docs/build.md) compiles the
kernels in csrc/ and ptx/ into cubins + PTX under pykernels/_kernels, which ship in the package.
"""
import importlib.util
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _kernel_build():
    # Loaded by path: importing the package would import torch, which the build
    # environment need not have.
    spec = importlib.util.spec_from_file_location("kernel_build", ROOT / "pykernels/runtime/kernel_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildKernels(build_ext):
    """build_ext that also compiles the kernels (so `pip install -e .` builds them too)."""

    def run(self):
        kb = _kernel_build()
        kb.build(ROOT, ROOT / "pykernels" / "_kernels", jobs=self.parallel or 2)
        super().run()
        if not self.inplace:  # wheel builds: copy the artifacts beside the package
            dest = Path(self.build_lib) / "pykernels" / "_kernels"
            dest.mkdir(parents=True, exist_ok=True)
            for f in (ROOT / "pykernels" / "_kernels").iterdir():
                (dest / f.name).write_bytes(f.read_bytes())


class BuildPyWithKernels(build_py):
    def run(self):
        self.run_command("build_ext")
        super().run()


cuda_include = str(_kernel_build().find_cuda_home()[0] / "include")  # cuda.h (types only)

setup(
    ext_modules=[
        Pybind11Extension(
            "pykernels._C",
            ["csrc/host/module.cpp", "csrc/host/driver.cpp"],
            include_dirs=["csrc/host", cuda_include],
            libraries=["dl"],
            cxx_std=17,
        )
    ],
    cmdclass={"build_ext": BuildKernels, "build_py": BuildPyWithKernels},
)
