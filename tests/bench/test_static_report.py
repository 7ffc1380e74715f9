"""bench/static_report.py: the ptxas-log and SASS parsers, the sm_90 occupancy arithmetic, the issue-15
flags and the RESULTS.md splice on fixed text (pure functions), and one real sm_90 compile of a small
Triton kernel through the report's own path (needs triton, no GPU)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bench import static_report as sr

ROOT = Path(__file__).resolve().parents[2]

PTXAS_TRITON = """\
ptxas-blackwell info    : 0 bytes gmem
ptxas-blackwell info    : Compiling entry function '_mp_fwd_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for _mp_fwd_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas-blackwell info    : Used 255 registers, used 1 barriers
ptxas-blackwell info    : Compiling entry function '_lm_bwd_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for _lm_bwd_kernel
    440 bytes stack frame, 420 bytes spill stores, 396 bytes spill loads
ptxas-blackwell info    : Used 255 registers, used 1 barriers
"""
PTXAS_NVCC = """\
ptxas info    : Compiling entry function '_Z9mp_kernelIfEv6Params' for 'sm_90'
ptxas info    : Function properties for _Z9mp_kernelIfEv6Params
    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 16 bytes smem, 400 bytes cmem[0]
"""

SASS = """\
\t.target\tsm_90a
//--------------------- .text._mp_fwd_kernel   --------------------------
\t.section\t.text._mp_fwd_kernel,"ax",@progbits
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R2.64] ;
        /*0020*/               @P0 FFMA R3, R2, R5, R3 ;
        /*0030*/              @!P1 FFMA R4, R2, R5, R4 ;
        /*0040*/                   MUFU.EX2 R6, R6 ;
        /*0050*/                   MUFU.EX2 R7, R7 ;
        /*0060*/                   MUFU.RCP R8, R8 ;
        /*0070*/                   LDS.128 R8, [R9] ;
        /*0080*/                   HGMMA.64x32x8.F32.TF32 R24, gdesc[UR4], R24 ;
        /*0090*/                   STG.E desc[UR4][R2.64], R3 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   BRA `(.L_x_1) ;
        /*00c0*/                   NOP;
//--------------------- .text._other   --------------------------
\t.section\t.text._other,"ax",@progbits
        /*0000*/                   DFMA R2, R4, R6, R2 ;
        /*0010*/                   STL [R1], R2 ;
        /*0020*/                   EXIT ;
"""


def test_parse_ptxas_log_triton_and_nvcc():
    log = sr.parse_ptxas_log(PTXAS_TRITON + PTXAS_NVCC)
    assert log["_mp_fwd_kernel"] == {"registers": 255, "spill_stores": 0, "spill_loads": 0, "stack": 0, "smem": 0}
    assert log["_lm_bwd_kernel"]["spill_stores"] == 420 and log["_lm_bwd_kernel"]["spill_loads"] == 396
    assert log["_lm_bwd_kernel"]["stack"] == 440
    assert log["_Z9mp_kernelIfEv6Params"] == {"registers": 64, "spill_stores": 0, "spill_loads": 0, "stack": 8,
                                              "smem": 16}


def test_parse_sass_and_instruction_mix():
    funcs = sr.parse_sass(SASS)
    assert set(funcs) == {"_mp_fwd_kernel", "_other"}
    fwd = funcs["_mp_fwd_kernel"]
    assert fwd["FFMA"] == 2 and fwd["MUFU.EX2"] == 2 and fwd["LDS.128"] == 1 and fwd["NOP"] == 1
    mix = sr.instruction_mix(fwd)
    assert mix["total"] == 12  # 13 instructions, the NOP left out
    assert mix["ffma"] == 2 and mix["mufu"] == 3 and mix["ex2"] == 2
    assert mix["mufu_kinds"] == {"EX2": 2, "RCP": 1}
    assert mix["lds_share"] == pytest.approx(1 / 12) and mix["ldg_share"] == pytest.approx(1 / 12)
    assert mix["stg_share"] == pytest.approx(1 / 12) and mix["fma_share"] == pytest.approx(2 / 12)
    assert mix["mma"] == ["HGMMA"] and mix["local"] == 0
    other = sr.instruction_mix(funcs["_other"])
    assert other["dfma"] == 1 and other["local"] == 1 and other["mma"] == []


def test_occupancy_against_sm90_limits():
    # 255 registers -> 8,192 per warp: two warps per sub-partition, one 8-warp CTA (the issue's 12.5 %).
    full = sr.occupancy(255, 0, 8)
    assert full["ctas"] == 1 and full["warps_per_sm"] == 8 and full["limiter"] == "registers"
    assert full["occupancy"] == pytest.approx(0.125)
    assert sr.occupancy(128, 0, 8)["ctas"] == 2  # 4,096 per warp: four per sub-partition
    assert sr.occupancy(130, 0, 8)["ctas"] == 1  # rounds up to 136 -> 4,352 per warp: three per sub-partition
    small = sr.occupancy(32, 0, 4)  # registers would allow 16 CTAs; 64 warps allow 16
    assert small["ctas"] == 16 and small["warps_per_sm"] == 64 and "warps" in small["limiter"]
    assert sr.occupancy(16, 0, 1)["ctas"] == 32  # the 32-CTA cap
    # 100 KB + 1 KB reserved per CTA: two fit in 228 KB
    shared = sr.occupancy(32, 100 * 1024, 4)
    assert shared["ctas"] == 2 and shared["limiter"] == "shared"
    assert sr.occupancy(32, 228 * 1024, 4)["ctas"] == 0  # over the 227 KB a CTA may have
    assert sr.occupancy(256, 0, 4)["limiter"] == "cannot launch"


def _row(**kw):
    row = {"module": "message_passing", "label": "message_passing", "kernel": "fwd", "dtype": "float32",
           "entry": "_mp_fwd_kernel", "num_warps": 8, "num_stages": 2, "shared": 4096, "registers": 128,
           "spill_stores": 0, "spill_loads": 0, "stack": 0, "sass": {"FFMA": 10, "MUFU.EX2": 4}, "error": None}
    row.update(kw)
    return sr.finish_row(row)


def test_flags_against_issue_targets():
    assert sr.flags_for(_row()) == []
    bad = sr.flags_for(_row(registers=255, spill_stores=8, spill_loads=4))
    assert any("spills 8+4" in f for f in bad) and any("regs 255 > 128" in f for f in bad)
    assert any("1 CTA/SM < 2" in f for f in bad)
    # the register and CTA targets are the float32 forward's; spills count everywhere
    assert sr.flags_for(_row(dtype="float64", registers=255)) == []
    assert sr.flags_for(_row(kernel="bwd0", registers=255)) == []
    assert sr.flags_for(_row(kernel="bwd0", spill_stores=4)) == ["spills 4+0 B"]
    # a CUDA kernel marked forward is held to the same targets
    assert sr.flags_for(_row(kernel="mp_kernel<float>", forward=True, registers=200))
    assert sr.flags_for(_row(), exp_per_edge=256) == []
    assert sr.flags_for(_row(), exp_per_edge=257) == ["exp/edge 257 > 2×128"]
    assert sr.flags_for({"module": "x", "kernel": "*", "error": "boom"}) == ["did not compile"]


def test_cost_model_columns_come_from_cost_model():
    flops, fused = sr.cost_per_edge("message_passing", "float32")
    from bench import cost_model

    assert flops == cost_model.op_flops_per_edge(512, 128)
    assert fused == cost_model.op_bytes_per_edge(512, 128, 4, sr.EDGES_PER_ATOM, fused=True)
    assert sr.cost_per_edge("message_passing", "float64")[1] > fused
    assert sr.cost_per_edge("radius_graph", "float64") is None


def test_splice_replaces_only_the_section():
    text = "# Results\n\nbody\n"
    once = sr.splice(text, "## A\nfirst")
    assert once.startswith(text.rstrip("\n")) and sr.BEGIN in once and once.rstrip().endswith(sr.END)
    again = sr.splice(once + "\n## After\nkept\n", "## A\nsecond")
    assert "first" not in again and "second" in again and again.count(sr.BEGIN) == 1
    assert again.startswith("# Results\n\nbody") and again.endswith("## After\nkept\n")
    assert sr.splice("", "x") == f"{sr.BEGIN}\nx\n{sr.END}\n"


def test_setup_nvcc_flags_read_from_setup_py(tmp_path):
    setup = tmp_path / "setup.py"
    setup.write_text(
        "import os\nCSRC = 'csrc'\n"
        "def _nvcc_arch_flags():\n    return ['-gencode', 'arch=compute_90,code=sm_90']\n"
        "def _fmad(src):\n    return ['-fmad=false'] if 'radius' in src else []\n"
        "class B:\n    def run(self):\n        def compile_cu(src):\n"
        "            cmd = [nvcc, '-std=c++17', '-O3', *_fmad(src), '-I', CSRC, *_nvcc_arch_flags(), '-c', src,"
        " '-o', obj]\n            return cmd\n"
        "setup(ext_modules=[])\n")
    flags, how = sr.setup_nvcc_flags("csrc/radius_graph_cuda.cu", setup)
    assert flags == ["-std=c++17", "-O3", "-fmad=false", "-I", "csrc"] and how == "setup.py compile_cu"
    assert sr.setup_nvcc_flags("csrc/message_passing_cuda.cu", setup)[0] == ["-std=c++17", "-O3", "-I", "csrc"]
    (tmp_path / "broken.py").write_text("def nothing(:\n")
    flags, how = sr.setup_nvcc_flags("csrc/x.cu", tmp_path / "broken.py")
    assert "-O3" in flags and how.startswith("fixed copy")


def test_launch_bounds_and_names():
    elf = (".nv.info._Z3fooPf\n\t<0x1>\n\tAttribute:\tEIATTR_MAX_THREADS\n\tFormat:\tEIFMT_SVAL\n"
           "\tValue:\t0x100 0x1 0x1 \n.nv.info._Z3barv\n\tAttribute:\tEIATTR_CUDA_API_VERSION\n\tValue:\t0x82\n")
    assert sr.parse_max_threads(elf) == {"_Z3fooPf": 256}
    assert sr.short_name("void e3mp::(anonymous namespace)::mp_kernel<double>(e3mp::Params<double>)") \
        == "mp_kernel<double>"


def test_error_text_reaches_the_innermost_cause():
    try:
        try:
            raise AssertionError("line one\nint32[] used as tl.static_range start value is not a constexpr")
        except AssertionError as inner:
            raise RuntimeError("at 27:17:\n    fs = basis(x) | y") from inner
    except RuntimeError as exc:
        text = sr.error_text(exc)
    assert text.startswith("RuntimeError: at 27:17:") and "not a constexpr" in text and "|" not in \
        text.replace("\\|", "")


def test_markdown_reports_a_missing_version_and_the_flags():
    version = {"triton": "9.9.9", "python": "3.11", "rows": [
        {"module": "message_passing", "label": "message_passing", "kernel": "fwd", "dtype": "float32",
         "entry": "_mp_fwd_kernel", "num_warps": 8, "num_stages": 1, "shared": 0, "registers": 255,
         "spill_stores": 0, "spill_loads": 0, "stack": 0, "sass": dict(Counter({"MUFU.EX2": 48})), "error": None},
        {"module": "lattice_pool", "label": "lattice_pool", "kernel": "*", "dtype": "float64",
         "error": "CompilationError: boom"}]}
    missing = sr.run_worker("/nonexistent/bin/python", "--worker", 10)
    assert "not found" in missing["error"]
    exp = {"rows": [{"module": "message_passing", "phase": "forward", "function": "_mp_fwd_kernel", "launches": 1,
                     "exps": 6144 * 10, "edges": 10, "per_edge": 6144.0, "problem": "10 edges"}], "errors": []}
    md = sr.build_markdown([version, missing], None, exp, "today")
    assert "Triton 9.9.9" in md and "**missing: interpreter not found: /nonexistent/bin/python**" in md
    assert "regs 255 > 128" in md and "1 CTA/SM < 2" in md and "exp/edge 6,144 > 2×128" in md
    assert "CompilationError: boom" in md and "| 6,144.0 | **missed** |" in md
    assert str(sr.TRITON36) in sr.default_pythons()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_compiles_one_small_kernel_for_sm90(tmp_path):
    """The lattice pool's kernel through the report's own compile path, in a subprocess without the
    interpreter: registers from the ptxas log, SASS from nvdisasm, occupancy from both."""
    env = sr._worker_env(interpret=False)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    script = ("import json; from bench import static_report as sr; from e3relax_fast.ops.table import _kernel_module;"
              "m = _kernel_module('lattice_pool');"
              "print(json.dumps(sr._compile_one(m, 'lattice_pool', {}, 'float32', sr._triton_tool('nvdisasm'))))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rows and all(r["error"] is None for r in rows), rows
    row = sr.finish_row(rows[0])
    assert 1 <= row["registers"] <= 255 and row["spill_stores"] is not None
    assert row["mix"]["total"] > 0 and sum(v for k, v in row["sass"].items() if k.startswith("EXIT")) >= 1
    assert 1 <= row["ctas"] <= 32 and row["warps_per_sm"] == row["ctas"] * row["num_warps"]
