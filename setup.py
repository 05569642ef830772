"""Build of fastalign: the Python packages plus the optional native extension ``fastalign._C``.

Intended install (torch first, so that no isolated build env pulls a multi-GB CUDA torch)::

    pip install torch==2.13.0
    pip install setuptools wheel pybind11 cmake ninja
    pip install --no-build-isolation .        # or -e .

``fastalign._C`` is compiled with CMake (CMakeLists.txt, sources in csrc/).  It links neither libtorch
nor libpython (NumPy arrays and raw pointers cross the boundary), so it does not need torch to compile;
torch is only asked whether it is a CUDA build.  If anything about the native build fails, the package
still installs (with a warning; ``pip install -v`` shows it) and runs on the pure-PyTorch fallback.
A second step builds ``fastalign/_torch_ops.so`` (csrc/torch_ops.cpp) against the installed torch's headers
and libraries: C++ kernels of fastalign's torch ops on _C's loops. Where it fails, the ops keep their Python
kernels (a warning, as above); it is used only under the torch it was built for.

Environment switches:
    FASTALIGN_NO_NATIVE=1       do not build fastalign._C at all
    FASTALIGN_REQUIRE_NATIVE=1  make a failed native build an error instead of a warning (the torch ops
                                library's included: it then needs torch importable at build time)
    FASTALIGN_CUDA=1 / 0        force the CUDA sources on / off (default: on when a CUDA toolkit is found
                                AND the installed torch is a CUDA build)
    FASTALIGN_CUDA_ARCHS        CMake CUDA architectures, e.g. "80-real;90" (default: TORCH_CUDA_ARCH_LIST
                                when set, else "all-major")
    FASTALIGN_DEBUG=1           Debug build of the extension
    CUDA_HOME / CUDA_PATH       where to look for nvcc (else PATH, /usr/local/cuda)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from setuptools import Extension, find_namespace_packages, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
TORCH_OPS_LIBRARY = "_torch_ops.so"  # next to fastalign._C (fastalign.models.native loads it)


def _flag(name: str) -> bool | None:
    """True / False for a set environment switch, None when unset or empty."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    return value not in ("0", "false", "no", "off")


def _log(msg: str) -> None:
    print(f"[fastalign build] {msg}", file=sys.stderr, flush=True)


def _warn(msg: str) -> None:
    # pip shows stderr of a successful build only with -v; also leave a mark in the build log
    _log(f"WARNING: {msg}")


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _find_tool(name: str) -> str | None:
    """``name`` (cmake or ninja) on PATH, else the binary of its PyPI package."""
    exe = shutil.which(name)
    if exe:
        return exe
    try:
        module = __import__(name)
        exe = os.path.join(module.CMAKE_BIN_DIR if name == "cmake" else module.BIN_DIR, name)
        return exe if os.path.exists(exe) or os.path.exists(exe + ".exe") else None
    except Exception:
        return None


def _pybind11_include() -> str | None:
    try:
        import pybind11

        return pybind11.get_include()
    except Exception:
        pass
    try:  # torch bundles the pybind11 headers
        import torch

        inc = os.path.join(os.path.dirname(torch.__file__), "include")
        if os.path.exists(os.path.join(inc, "pybind11", "pybind11.h")):
            return inc
    except Exception:
        pass
    return None


def _find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"):
        home = os.environ.get(var)
        if home:
            exe = os.path.join(home, "bin", "nvcc")
            if os.path.exists(exe) or os.path.exists(exe + ".exe"):
                return exe
    exe = shutil.which("nvcc")
    if exe:
        return exe
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda/bin/nvcc"
    return None


def _torch_cuda() -> str | None:
    """The CUDA version torch was built with, None for a CPU build or when torch is not importable."""
    try:
        import torch

        return torch.version.cuda
    except Exception:
        return None


def _cuda_archs() -> str:
    archs = os.environ.get("FASTALIGN_CUDA_ARCHS", "").strip()
    if archs:
        return archs
    torch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    out = []
    for item in re.split(r"[;\s,]+", torch_list):
        m = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", item, flags=re.IGNORECASE)
        if m:
            arch = f"{m.group(1)}{m.group(2)}{m.group(3).lower()}"
            out.append(arch if m.group(4) else f"{arch}-real")
    return ";".join(out) if out else "all-major"


def torch_build() -> str:
    """The installed torch's version and git commit: ``fastalign/_torch_ops.so`` is used under that torch only
    (``fastalign.models.native`` compares)."""
    import torch

    return f"{torch.__version__} {torch.version.git_version}"


class CMakeBuild(build_ext):
    """Builds CMakeExtensions with CMake; a failure only warns (unless FASTALIGN_REQUIRE_NATIVE=1)."""

    def run(self) -> None:
        for ext in list(self.extensions):
            if not isinstance(ext, CMakeExtension):
                continue
            try:
                self._build_cmake(ext)
            except Exception as exc:  # noqa: BLE001 - any failure falls back to pure Python
                if _flag("FASTALIGN_REQUIRE_NATIVE"):
                    raise
                _warn(
                    f"building the native extension {ext.name} failed ({exc}); installing without it. "
                    "fastalign works on its pure-PyTorch fallback (fastalign.models.native.native_available() "
                    "is False). Set FASTALIGN_REQUIRE_NATIVE=1 to make this an error."
                )
                self.extensions.remove(ext)
                stale = os.path.abspath(self.get_ext_fullpath(ext.name))
                for path in (stale, os.path.join(os.path.dirname(stale), TORCH_OPS_LIBRARY)):
                    if os.path.exists(path):  # never ship an old build next to a failed one
                        os.remove(path)
        others = [e for e in self.extensions if not isinstance(e, CMakeExtension)]
        if others:
            saved, self.extensions = self.extensions, others
            try:
                super().run()
            finally:
                self.extensions = saved

    def _build_cmake(self, ext: CMakeExtension) -> None:
        cmake = _find_tool("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found (pip install cmake)")
        pybind11_inc = _pybind11_include()
        if pybind11_inc is None:
            raise RuntimeError("pybind11 headers not found (pip install pybind11)")

        out_path = os.path.abspath(self.get_ext_fullpath(ext.name))
        out_dir, out_name = os.path.split(out_path)
        build_dir = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        os.makedirs(out_dir, exist_ok=True)
        os.makedirs(build_dir, exist_ok=True)

        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DFASTALIGN_PYBIND11_INCLUDE={pybind11_inc}",
            f"-DFASTALIGN_OUTPUT_DIR={out_dir}",
            f"-DFASTALIGN_OUTPUT_NAME={out_name}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if _flag('FASTALIGN_DEBUG') else 'Release'}",
        ]
        ninja = _find_tool("ninja")
        cache = os.path.join(build_dir, "CMakeCache.txt")
        if os.path.exists(cache):  # a generator cannot change within one build dir
            with open(cache, encoding="utf-8", errors="replace") as f:
                ninja_cached = "CMAKE_GENERATOR:INTERNAL=Ninja" in f.read()
            if ninja_cached != bool(ninja):
                shutil.rmtree(build_dir)
                os.makedirs(build_dir)
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]

        want_cuda = _flag("FASTALIGN_CUDA")
        nvcc = _find_nvcc()
        torch_cuda = _torch_cuda()
        if want_cuda is None:
            use_cuda = bool(nvcc and torch_cuda)
            if nvcc and not torch_cuda:
                _log(f"nvcc found ({nvcc}) but torch is not a CUDA build (or not importable): CUDA sources skipped")
        else:
            use_cuda = want_cuda
            if use_cuda and not nvcc:
                raise RuntimeError("FASTALIGN_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        cuda_args = ["-DFASTALIGN_WITH_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}",
                     f"-DCMAKE_CUDA_ARCHITECTURES={_cuda_archs()}"] if use_cuda else []

        try:
            self._cmake(cmake, build_dir, args + (cuda_args or ["-DFASTALIGN_WITH_CUDA=OFF"]))
        except Exception as exc:
            if not use_cuda or want_cuda:
                raise
            _warn(f"CUDA build of {ext.name} failed ({exc}); retrying with the CPU sources only")
            shutil.rmtree(build_dir)
            os.makedirs(build_dir)
            self._cmake(cmake, build_dir, args + ["-DFASTALIGN_WITH_CUDA=OFF"])
        if not os.path.exists(out_path):
            raise RuntimeError(f"CMake finished but {out_path} was not produced")
        _log(f"built {out_path} ({'CPU + CUDA' if use_cuda else 'CPU'})")
        self._build_torch_ops(cmake, build_dir, out_dir)

    def _build_torch_ops(self, cmake: str, build_dir: str, out_dir: str) -> None:
        """fastalign/_torch_ops.so, where torch's headers compile here; else none (the ops' Python kernels run)."""
        library = os.path.join(out_dir, TORCH_OPS_LIBRARY)
        if os.path.exists(library):  # never keep one built for another torch
            os.remove(library)
        try:
            import torch
            from torch.utils import cpp_extension

            args = [f"-DFASTALIGN_TORCH_INCLUDE={';'.join(cpp_extension.include_paths())}",
                    f"-DFASTALIGN_TORCH_LIBRARY_DIR={cpp_extension.library_paths()[0]}",
                    f"-DFASTALIGN_TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                    f"-DFASTALIGN_TORCH_BUILT_FOR={torch_build()}"]
            self._cmake(cmake, build_dir, args, target="fastalign_torch_ops")
        except Exception as exc:  # noqa: BLE001 - the ops keep their Python kernels
            if _flag("FASTALIGN_REQUIRE_NATIVE"):
                raise
            _warn(f"building {TORCH_OPS_LIBRARY} failed ({exc}); fastalign's torch ops keep their Python kernels")
            return
        _log(f"built {library}")

    def _cmake(self, cmake: str, build_dir: str, args: list[str], target: str | None = None) -> None:
        """Configure ``build_dir`` with ``args``, then build ``target`` (default: all, which is ``_C``)."""
        _log("cmake " + " ".join(args))
        subprocess.run([cmake, "-S", ROOT, "-B", build_dir, *args], check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(self.parallel or os.cpu_count() or 1)
        subprocess.run([cmake, "--build", build_dir, *(["--target", target] if target else []), "--parallel", jobs],
                       check=True)


class BuildPy(build_py):
    """Drops ``fastalign/_C*`` left in build/lib by an earlier build, so that a wheel built with
    FASTALIGN_NO_NATIVE=1 (or after a failed native build) never carries a stale extension."""

    def run(self) -> None:
        pkg_dir = os.path.join(self.build_lib, "fastalign")
        if os.path.isdir(pkg_dir):
            for name in os.listdir(pkg_dir):
                if name.startswith(("_C.", "_torch_ops.")) and name.endswith((".so", ".pyd", ".dylib")):
                    os.remove(os.path.join(pkg_dir, name))
        super().run()


def _ext_modules() -> list[Extension]:
    if _flag("FASTALIGN_NO_NATIVE"):
        _log("FASTALIGN_NO_NATIVE set: skipping the native extension")
        in_tree = [n for n in os.listdir(os.path.join(ROOT, "fastalign")) if n.startswith(("_C.", "_torch_ops."))]
        if in_tree:
            _warn(f"{', '.join('fastalign/' + n for n in in_tree)} from an earlier in-place build is still in the "
                  "source tree; an editable install will load it (delete it to run on the pure-PyTorch fallback)")
        return []
    return [CMakeExtension("fastalign._C")]


_kernel_subpackages = ["fastalign.kernels." + p for p in find_packages(os.path.join(ROOT, "kernels"))]
# Shipped data (tiny models, manifests) under fastalign/data/: every directory there is a data-only
# namespace package whose files are all package data (this keeps setuptools from warning about them).
_data_packages = find_namespace_packages(ROOT, include=["fastalign.data", "fastalign.data.*"], exclude=["*.__pycache__"])

setup(
    name="fastalign",
    version="0.1.0",
    description="Fast test-time alignment methods for LLMs",
    packages=sorted(set(find_packages(ROOT, include=["fastalign", "fastalign.*"]) + _data_packages))
    + ["fastalign.kernels"] + _kernel_subpackages,
    package_dir={"fastalign": "fastalign", "fastalign.kernels": "kernels"},
    package_data={pkg: ["*"] for pkg in _data_packages},
    include_package_data=True,
    exclude_package_data={"": ["*.so", "*.pyd", "*.pyc"]},
    ext_modules=_ext_modules(),
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy},
    python_requires=">=3.10",
    # transformers: the range tested (5.24 names the KV cache argument `cache`; 6 may change the cache API).
    # triton is not required: the kernels fall back to their PyTorch references without it, and CUDA builds of
    # torch bring it anyway. The test suite runs the Triton code under its CPU interpreter, so `test` has it.
    install_requires=["torch>=2.4", "transformers>=5.24,<6", "numpy", "tqdm"],
    extras_require={"test": ["pytest", "matplotlib", "hypothesis", "triton>=3.0; platform_system == 'Linux'"],
                    "eval": ["matplotlib", "datasets"], "flash": ["flash-attn"],
                    "real": ["gguf", "accelerate", "vaderSentiment"]},  # GGUF models, the VADER reward
    entry_points={"console_scripts": ["fastalign=fastalign.cli:main"]},
    zip_safe=False,
)
