"""Build script. Metadata lives in pyproject.toml; this file adds the optional compiled extension.

``e3relax_fast._C`` (csrc/) is a nanobind module over DLPack arrays: no torch headers, so it does
not depend on the installed torch. It is optional in every respect:

* built when a C++ compiler and nanobind are available (nanobind is a build requirement);
* its CUDA part (csrc/*_cuda.cu, linked with the static CUDA runtime) is compiled only
  when ``nvcc`` is found (``$CUDA_HOME/bin``, ``$PATH``, ``/usr/local/cuda*``); the module still
  imports on machines without a GPU driver and reports that at run time;
* any failure prints a warning and the install goes on without the failing part: without CUDA
  if only the CUDA part failed, without the extension otherwise (the package then uses its
  pure-PyTorch implementations).

Environment: ``E3RELAX_NO_EXT=1`` skips the extension, ``E3RELAX_NO_CUDA=1`` skips its CUDA part,
``E3RELAX_CUDA_ARCH`` (default ``90``; e.g. ``"80;90"``) lists the SASS targets (a PTX of the
highest is always added), ``E3RELAX_BUILD_JOBS`` caps parallel compile jobs.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
OUR_SOURCES = [os.path.join(CSRC, f) for f in ("module.cpp", "radius_graph_cpu.cpp", "radius_graph_cpu_avx512.cpp",
                                                "radius_graph_warp_emulation.cpp", "thread_pool.cpp",
                                                "output_cache.cpp", "message_passing_cuda_emulation.cpp",
                                                "message_passing_cpu.cpp", "message_passing_cpu_avx512.cpp",
                                                "message_passing_backward_cpu.cpp",
                                                "lattice_message_cpu.cpp", "lattice_message_cpu_avx512.cpp",
                                                "frame_cpu.cpp")]
# nvcc flags per CUDA source. -fmad=false (no FMA contraction) only where bit-exactness needs it:
# the radius graph, whose float64 distances are an exact contract (csrc/radius_graph.h; its
# contract operations are also explicit __d*_rn intrinsics, the flag keeps the bounds and the
# fractional coordinates identical to the CPU launcher's). The message kernel is checked against
# the reference within a tolerance and keeps nvcc's default contraction (FFMA in its gate loop).
CUDA_SOURCE_FLAGS = {
    os.path.join(CSRC, "radius_graph_cuda.cu"): ["-fmad=false"],
    os.path.join(CSRC, "message_passing_cuda.cu"): [],
}
CUDA_SOURCES = list(CUDA_SOURCE_FLAGS)
HEADERS = [os.path.join(CSRC, h) for h in ("radius_graph.h", "radius_graph_api.h", "radius_graph_cpu_internal.h",
                                           "thread_pool.h", "output_cache.h", "message_passing.h",
                                           "message_passing_api.h", "radial_window.h", "fused_cpu.h",
                                           "fused_cpu_avx512.h", "frame_cpu.h")]
# nanobind's core as one translation unit (its documented non-CMake route; the file list of the
# unity source follows the installed nanobind version).
NB_CORE = ["nb_combined.cpp"]
# -ffp-contract=off: the neighbour distance is an exact float64 contract (csrc/radius_graph.h).
OUR_FLAGS = ["-std=c++17", "-O3", "-g0", "-fvisibility=hidden", "-ffp-contract=off", "-fno-math-errno"]
NB_FLAGS = ["-std=c++17", "-Os", "-g0", "-fvisibility=hidden", "-fno-strict-aliasing", "-ffunction-sections",
            "-fdata-sections", "-DNB_COMPACT_ASSERTIONS"]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _warn(msg: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\nWARNING (e3relax_fast._C): {msg}\n{bar}\n", file=sys.stderr, flush=True)


def find_cuda() -> tuple[str, str] | None:
    """``(nvcc, cudart_static_dir)`` or None."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    which = shutil.which("nvcc")
    if which:
        candidates.append(which)
    candidates.append("/usr/local/cuda/bin/nvcc")
    candidates += sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), reverse=True)
    for nvcc in candidates:
        if not os.path.isfile(nvcc):
            continue
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                    os.path.join("targets", "sbsa-linux", "lib")):
            d = os.path.join(home, sub)
            if os.path.isfile(os.path.join(d, "libcudart_static.a")):
                return nvcc, d
    return None


def _nvcc_arch_flags() -> list[str]:
    archs = [a.strip().replace(".", "") for a in os.environ.get("E3RELAX_CUDA_ARCH", "90").replace(",", ";").split(";")]
    archs = sorted({a for a in archs if a.isdigit()}, key=int) or ["90"]
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


class OptionalBuildExt(build_ext):
    """Compiles nanobind's core, our C++ and (optionally) CUDA sources in parallel, links one
    module; never fails the install."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - the extension is optional
            _warn(f"build failed ({exc}); installing without the compiled extension.")

    def get_outputs(self):
        return [p for p in super().get_outputs() if os.path.exists(p)]

    def build_extension(self, ext):
        if ext.name != "e3relax_fast._C":
            return super().build_extension(ext)
        try:
            import nanobind
        except ImportError:
            _warn("nanobind is not installed; installing without the compiled extension.")
            return
        cuda = None
        if _env_flag("E3RELAX_NO_CUDA"):
            print("e3relax_fast._C: CUDA part skipped (E3RELAX_NO_CUDA=1)", flush=True)
        else:
            cuda = find_cuda()
            if cuda is None:
                print("e3relax_fast._C: nvcc/libcudart_static not found, building the CPU part only", flush=True)
        try:
            self._build(ext, nanobind, cuda)
        except Exception as exc:  # noqa: BLE001
            if cuda is None:
                _warn(f"build failed ({exc}); installing without the compiled extension.")
                return
            _warn(f"build with CUDA failed ({exc}); retrying without CUDA.")
            try:
                self._build(ext, nanobind, None)
            except Exception as exc2:  # noqa: BLE001
                _warn(f"build failed ({exc2}); installing without the compiled extension.")

    def _build(self, ext, nanobind, cuda):
        nb_dir = os.path.dirname(nanobind.__file__)
        nb_src = nanobind.source_dir()
        includes = [nanobind.include_dir(), os.path.join(nb_dir, "ext", "robin_map", "include"), CSRC]
        includes += [sysconfig.get_paths()["include"], sysconfig.get_paths()["platinclude"]]
        tmp = os.path.join(self.build_temp, "e3relax_c" + ("_cuda" if cuda else ""))
        os.makedirs(tmp, exist_ok=True)
        cc = self.compiler
        defines = [("NDEBUG", None)] + ([("E3RELAX_WITH_CUDA", None)] if cuda else [])

        def compile_cpp(src: str, flags: list[str]) -> str:
            return cc.compile([src], output_dir=tmp, macros=defines, include_dirs=includes, extra_postargs=flags)[0]

        def compile_cu(src: str) -> str:
            nvcc, _ = cuda
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            cmd = [nvcc, "-std=c++17", "-O3", *CUDA_SOURCE_FLAGS[src], "-DE3RELAX_WITH_CUDA", "-DNDEBUG", "-I", CSRC,
                   "-Xcompiler", "-fPIC,-fvisibility=hidden,-ffp-contract=off", *_nvcc_arch_flags(),
                   "-c", src, "-o", obj]
            ccbin = os.environ.get("CUDAHOSTCXX")
            if ccbin:
                cmd[1:1] = ["-ccbin", ccbin]
            print(" ".join(cmd), flush=True)
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"nvcc failed:\n{res.stdout}\n{res.stderr}")
            return obj

        jobs = [(compile_cpp, (os.path.join(nb_src, f), NB_FLAGS)) for f in NB_CORE]
        jobs += [(compile_cpp, (s, OUR_FLAGS)) for s in OUR_SOURCES]
        jobs.sort(key=lambda job: "nb_combined" not in job[1][0])  # the longest C++ job first
        if cuda:
            jobs = [(compile_cu, (s,)) for s in CUDA_SOURCES] + jobs  # longest first
        n_jobs = int(os.environ.get("E3RELAX_BUILD_JOBS", "0") or 0) or (os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=max(1, n_jobs)) as pool:
            objects = list(pool.map(lambda job: job[0](*job[1]), jobs))

        libs, lib_dirs, link_args = [], [], ["-Wl,--gc-sections", "-Wl,-s"]
        if cuda:
            lib_dirs.append(cuda[1])
            libs += ["cudart_static", "rt", "pthread", "dl"]
        ext_path = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(ext_path), exist_ok=True)
        cc.link_shared_object(objects, ext_path, libraries=libs, library_dirs=lib_dirs, extra_postargs=link_args,
                              target_lang="c++")
        print(f"e3relax_fast._C built ({'CPU + CUDA' if cuda else 'CPU only'}): {ext_path}", flush=True)


ext_modules = []
if not _env_flag("E3RELAX_NO_EXT"):
    ext_modules.append(Extension("e3relax_fast._C", sources=OUR_SOURCES + CUDA_SOURCES, depends=HEADERS, optional=True))

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
