"""scripts/kernel_report.py: the SASS loop counter on hand-written SASS, and one real compile for sm_90a (CPU only)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "kernel_report.py"


def _load_report_module():
    spec = importlib.util.spec_from_file_location("kernel_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kr = _load_report_module()


def _python(*args, timeout=400):
    """Runs `python *args` in the repository without TRITON_INTERPRET (the kernels must compile, not interpret);
    checks that it exited 0 and returns the finished process."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _sass(instructions):
    """cuobjdump -sass style lines for [(address, text)], with the encoding comments cuobjdump prints."""
    lines = ["\tcode for sm_90a", "\t\tFunction : k", '\t.headerflags\t@"EF_CUDA_SM90"']
    for addr, text in instructions:
        lines.append(f"        /*{addr:04x}*/                   {text} ;   /* 0x000fe20000000a00 */")
        lines.append("                                                       /* 0x000fc4000001ff00 */")
    return "\n".join(lines)


def _program(body):
    """Addresses 0x10 apart for a list of instruction texts; a `BRA {label}` names the index it jumps to."""
    return [(16 * i, text.format(*[f"0x{16 * j:x}" for j in range(len(body))])) for i, text in enumerate(body)]


def test_main_loop_counts_the_span_from_the_branch_target_to_the_backward_branch():
    body = ["S2R R0, SR_CTAID.X"] * 3                          # 0-2: prologue
    body += ["FFMA R1, R2, R3, R1"] * 10                       # 3-12: loop head
    body += ["@P0 BRA {20}"]                                   # 13: a forward branch (an `if`) inside the loop
    body += ["HMMA.16816.F32 R4, R8, R12, R4"] * 6             # 14-19
    body += ["FADD R1, R1, 1"] * 10                            # 20-29
    body += ["NOP"] * 2                                        # 30-31: padding is not counted
    body += ["@!P1 BRA {3}"]                                   # 32: the backward branch
    body += ["EXIT", "BRA {34}", "NOP", "NOP"]                 # 33-36: the end-of-kernel self-branch is no loop
    sass = _sass(_program(body))
    loop = kr.main_loop(sass)
    assert loop == {"instructions": 28, "loop": "innermost of 1", "loops": 1, "inner": [28],  # 3..32, less 2 NOPs
                    "mma": {"wgmma": 0, "mma.sync": 6}}
    assert kr.tensor_core_op(sass) == "mma.sync"


def test_main_loop_takes_the_innermost_loop_and_ignores_spin_waits():
    body = ["MOV R0, RZ"]                                      # 0
    body += ["LDG.E R2, desc[UR4][R4.64]"] * 5                 # 1-5: outer loop head
    body += ["FFMA R1, R2, R3, R1"] * 40                       # 6-45: inner loop, 40 + its branch
    body += ["@P0 BRA {6}"]                                    # 46
    body += ["SYNCS.PHASECHK.TRANS64 P1, [UR4], RZ", "@!P1 BRA {47}"]   # 47-48: an mbarrier wait (spin loop)
    body += ["IADD3 R0, R0, 1, RZ"] * 3                        # 49-51
    body += ["@P2 BRA {1}", "HGMMA.64x64x16.F32 R24, gdesc[UR8], RZ, !UPT, gsb0", "EXIT"]  # 52: outer back-branch
    sass = _sass(_program(body))
    assert kr.find_loops(kr.parse_sass(sass)) == [(0x60, 0x2e0), (0x2f0, 0x300), (0x10, 0x340)]
    assert kr.main_loop(sass) == {"instructions": 41, "loop": "innermost of 2", "loops": 2, "inner": [41],
                                  "mma": {"wgmma": 0, "mma.sync": 0}}
    assert kr.tensor_core_op(sass) == "wgmma"  # the kernel's, outside the hot loop


def test_main_loop_is_the_largest_of_sibling_loops_and_inner_lists_them_all():
    """The attention forward's three phases: loops before the band, on it (the bias tile: longer) and after it."""
    body = ["MOV R0, RZ"]                                      # 0
    body += ["FFMA R1, R2, R3, R1"] * 29 + ["@P0 BRA {1}"]     # 1-30: 30 instructions
    body += ["FFMA R1, R2, R3, R1"] * 39 + ["@P1 BRA {31}"]    # 31-70: 40, the band loop
    body += ["FFMA R1, R2, R3, R1"] * 24 + ["@P2 BRA {71}"]    # 71-95: 25
    body += ["EXIT", "BRA {97}"]
    loop = kr.main_loop(_sass(_program(body)))
    assert loop == {"instructions": 40, "loop": "innermost of 3", "loops": 3, "inner": [30, 40, 25],
                    "mma": {"wgmma": 0, "mma.sync": 0}}


def test_main_loop_counts_its_tensor_core_instructions_of_each_kind():
    """dK/dV at sm_90a: S and dP on mma.sync (32 query rows), dK and dV on wgmma, in one loop."""
    body = ["MOV R0, RZ"]                                                      # 0
    body += ["HMMA.16816.F32.BF16 R4, R8, R12, R4"] * 16                      # 1-16
    body += ["WARPGROUP.ARRIVE", "@P3 HGMMA.64x32x16.F32.BF16 R24, gdesc[UR4], R24, gsb0"] * 4  # 17-24
    body += ["FFMA R1, R2, R3, R1"] * 10 + ["@P0 BRA {1}", "HGMMA.64x64x16.F32 R24, gdesc[UR8], RZ, !UPT", "EXIT"]
    loop = kr.main_loop(_sass(_program(body)))
    assert loop["instructions"] == 35 and loop["mma"] == {"wgmma": 4, "mma.sync": 16}


def _nvdisasm(body):
    """nvdisasm -c style lines: no encodings, and a branch names its target by a label on the line before it."""
    targets = {int(m) for text in body for m in re.findall(r"BRA \{(\d+)\}", text)}
    lines = ["\t.section\t.text.k,\"ax\",@progbits", "k:"]
    for i, text in enumerate(body):
        if i in targets:
            lines.append(f".L_x_{i}:")
        text = re.sub(r"BRA \{(\d+)\}", lambda m: f"BRA `(.L_x_{m.group(1)})", text)
        lines.append(f"        /*{16 * i:04x}*/                   {text} ;")
    return "\n".join(lines)


def test_nvdisasm_labels_read_as_the_addresses_cuobjdump_prints():
    body = ["MOV R0, RZ"] + ["FFMA R1, R2, R3, R1"] * 29 + ["@P0 BRA {1}"]
    body += ["FFMA R1, R2, R3, R1"] * 39 + ["@!P1 BRA {31}", "@P2 BRA {73}", "EXIT", "BRA {73}"]
    nvdisasm, cuobjdump = _nvdisasm(body), _sass(_program(body))
    assert "BRA `(.L_x_31)" in nvdisasm and "0x" not in nvdisasm.split("BRA")[1].split(";")[0]
    assert kr.parse_sass(nvdisasm) == kr.parse_sass(cuobjdump)
    assert kr.main_loop(nvdisasm) == kr.main_loop(cuobjdump) == {
        "instructions": 40, "loop": "innermost of 2", "loops": 2, "inner": [30, 40], "mma": {"wgmma": 0, "mma.sync": 0}}


def test_main_loop_of_a_kernel_without_a_loop_is_the_whole_kernel():
    sass = _sass(_program(["S2R R0, SR_TID.X", "FADD R1, R0, R0", "STG.E desc[UR4][R2.64], R1", "EXIT", "BRA {4}",
                           "NOP"]))
    assert kr.main_loop(sass) == {"instructions": 5, "loop": "none", "loops": 0, "inner": [],
                                  "mma": {"wgmma": 0, "mma.sync": 0}}
    assert kr.tensor_core_op(sass) == "none"
    with pytest.raises(ValueError, match="no SASS"):
        kr.main_loop("not sass at all")


def test_ptxas_log_gives_registers_and_spills():
    log = ("ptxas info    : Compiling entry function '_bwd_dq_kernel' for 'sm_90a'\n"
           "    0 bytes stack frame, 48 bytes spill stores, 52 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n")
    assert kr.parse_ptxas_log(log) == {"regs": 255, "spill_bytes": 48, "spill_load_bytes": 52,
                                       "wgmma_serialized": None}
    serialized = ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized "
                  "due to non wgmma instructions defining accumulator registers of a wgmma between start and end of "
                  "the pipeline stage in the function '_fwd_kernel' in line 1432\n" + log)
    assert kr.parse_ptxas_log(serialized)["wgmma_serialized"] == (
        "C7515: due to non wgmma instructions defining accumulator registers of a wgmma between start and end of the "
        "pipeline stage")
    other = ("ptxas info    : (C7510) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
             "the presence of Extern calls in the function '_fwd_kernel'\n" + log)
    assert kr.parse_ptxas_log(other)["wgmma_serialized"] == "C7510: due to the presence of Extern calls"
    with pytest.raises(ValueError, match="registers and spills"):
        kr.parse_ptxas_log("ptxas fatal   : Unresolved extern function")


def test_blocks_per_sm_is_the_tightest_of_registers_shared_memory_and_warps():
    # 170 registers: 22 units of 256 per warp, 45056 per 8-warp block: one block in 65536 (128 registers: two).
    assert kr.blocks_per_sm("sm_90a", 170, 53760, 8) == 1
    assert kr.blocks_per_sm("sm_90a", 128, 53760, 8) == 2
    # 90 registers on 4 warps: 5 blocks by registers (96 per thread, 12288 per block); shared memory allows 3.
    assert kr.blocks_per_sm("sm_90a", 90, 73728, 4) == 3
    assert kr.blocks_per_sm("sm_80", 90, 73728, 4) == 2  # 164 KB per SM
    assert kr.blocks_per_sm("sm_86", 64, 99 * 1024, 4) == 1
    assert kr.blocks_per_sm("sm_86", 32, 50 * 1024, 4) == 1  # 50 KB + the 1 KB reserved, twice, pass 100 KB
    assert kr.blocks_per_sm("sm_90a", 100, 0, 4) == 4  # 100 registers take 104 (units of 256 per warp): 4, not 5
    assert kr.blocks_per_sm("sm_90a", 200, 0, 1) == 8  # 2 warps of 6400 registers in each quarter's 16384, not 10
    assert kr.blocks_per_sm("sm_90a", 32, 0, 1) == 32  # the block limit
    assert kr.blocks_per_sm("sm_86", 32, 0, 4) == 12  # the warp limit: 48 warps


def test_a_row_counts_loop_instructions_per_score_for_the_attention_tiles_only():
    compiled = dict(regs=146, smem_bytes=81920, num_warps=8, num_stages=3, loop_instructions=370)
    job = dict(kernel="attention_bwd_dq", arch="sm_90a", dtype="bf16", head_dim=64, hidden_size=None,
               kwargs=dict(BLOCK_M=64, BLOCK_N=64), dropout=False, key_padding=False, variant="", yardstick=False)
    row = kr.report_row(job, compiled)
    assert row["loop_instructions_per_score"] == 23.1  # 370 instructions x 256 threads / 4096 scores
    assert row["blocks_per_sm"] == 1
    four_warps = kr.report_row(job, dict(compiled, regs=188, num_warps=4, loop_instructions=465))
    assert four_warps["loop_instructions_per_score"] == 14.5  # more per thread, fewer per score
    norm = kr.report_row(dict(job, kernel="layer_norm_fwd", head_dim=None, hidden_size=768,
                              kwargs=dict(BLOCK_M=4, BLOCK_D=1024)), compiled)
    assert norm["loop_instructions_per_score"] is None


def test_report_compiles_the_d64_fp16_attention_forwards_for_sm90a(tmp_path):
    """The real path, CPU only: the dispatcher's launches (padded and packed) recorded, compiled for sm_90a, read back
    from the JSON."""
    args = [str(SCRIPT), "--out", str(tmp_path), "--arch", "sm_90a", "--dtype", "fp16", "--head-dim", "64", "--hidden",
            "768", "--kernel", "attention_fwd", "attention_fwd_varlen", "--no-progress"]
    result = _python(*args)
    report = json.loads((tmp_path / "kernel-report.json").read_text())
    rows = [r for r in report["rows"] if r["kernel"] == "attention_fwd"]
    varlen = [r for r in report["rows"] if r["kernel"] == "attention_fwd_varlen"]
    assert len(rows) + len(varlen) == len(report["rows"])
    assert [(r["dropout"], r["key_padding"], r["yardstick"]) for r in rows] == [
        (False, False, False), (False, True, False), (True, False, False), (True, True, False), (False, False, True)]
    assert [(r["dropout"], r["variant"]) for r in varlen] == [(False, "varlen"), (True, "varlen")]
    for row in rows + varlen:
        assert set(kr.FIELDS) <= set(row)
        assert (row["arch"], row["dtype"], row["head_dim"]) == ("sm_90a", "fp16", 64)
        assert row["block_m"] >= 16 and row["block_n"] >= 16 and row["num_warps"] >= 1 and row["num_stages"] >= 1
        assert 0 < row["regs"] <= 255
        assert row["spill_bytes"] >= 0 and row["smem_bytes"] > 0
        assert row["tensor_core_op"] == "wgmma"  # d64 fp16 on sm_90a compiles to HGMMA
        assert row["wgmma_serialized"] is None, row  # ptxas keeps the wgmma pipeline (no C7515)
        assert row["blocks_per_sm"] == kr.blocks_per_sm("sm_90a", row["regs"], row["smem_bytes"], row["num_warps"])
        assert row["blocks_per_sm"] >= 1
        assert row["loop_wgmma"] > 0 and row["loop_mma_sync"] == 0  # the forward's MMAs all run on wgmma
        assert row["loop_instructions_per_score"] == round(
            row["loop_instructions"] * 32 * row["num_warps"] / (row["block_m"] * row["block_n"]), 1)
        assert row["loop"].startswith("innermost") and row["loop_instructions"] > 0
    assert varlen[0]["loop_instructions"] < varlen[1]["loop_instructions"]  # dropout's mask is read in the loop
    assert "attention_fwd_varlen" in result.stdout
    plain, padded, dropout, _, yardstick = rows
    # The yardstick compiles the bias, the key padding and dropout out: its loop is strictly shorter.
    assert yardstick["loop_instructions"] < plain["loop_instructions"] < padded["loop_instructions"]
    assert plain["loop_instructions"] < dropout["loop_instructions"]
    assert "attention_fwd" in result.stdout and "wgmma" in result.stdout
    assert "7 compiled, 0 from the cache" in result.stdout
    assert "wgmma serialized by ptxas in 0 rows" in result.stdout

    # Run again: every figure comes from <out>/cache, the same; a cache file cut short is compiled again.
    (min((tmp_path / "cache").glob("*.json"))).write_text('{"regs": 1')
    again = _python(*args)
    assert "1 compiled, 6 from the cache" in again.stdout
    timing = {"compile_s", "compile_cpu_s"}
    cached = json.loads((tmp_path / "kernel-report.json").read_text())["rows"]
    assert [{k: v for k, v in r.items() if k not in timing} for r in cached] == [
        {k: v for k, v in r.items() if k not in timing} for r in report["rows"]]


_BATCHED_DISASSEMBLY_CHECK = """
import importlib.util, subprocess, sys
from pathlib import Path
import triton
from triton.compiler import ASTSource

spec = importlib.util.spec_from_file_location("kernel_report", sys.argv[1])
kr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kr)
kr._init_worker(sys.argv[2])
jobs = [job for job in kr.collect_configs(("sm_90a",), ("fp16",), (32,), (768,),
                                          ["attention_fwd_varlen", "layer_norm_fwd"]) if not job["dropout"]][:2]
assert sorted(job["kernel"] for job in jobs) == ["attention_fwd_varlen", "layer_norm_fwd"], jobs
cubins, expected = [], []
for i, job in enumerate(jobs):
    fn, target, source_args, options = kr._specialize(job)
    cubins.append(triton.compile(ASTSource(fn, *source_args), target=target, options=options.__dict__).asm["cubin"])
    path = Path(sys.argv[2]) / f"{i}.cubin"
    path.write_bytes(cubins[-1])
    sass = subprocess.run([kr._tool("nvdisasm"), "-c", "-ndf", str(path)], capture_output=True, text=True,
                          check=True).stdout
    expected.append(kr.parse_sass(sass))
codes = [kr.text_section(cubin) for cubin in cubins]
listings = kr.disassemble(codes + codes[:1], "sm_90a")  # the first kernel again, at a third start
assert listings == expected + expected[:1], "a kernel's listing differs from its cubin's"
attention = listings[jobs.index(next(j for j in jobs if j["kernel"] == "attention_fwd_varlen"))]
assert kr.find_loops(attention), "the attention kernel has loops"
assert any(kr._CODE_TARGET.match(text) for _, text in listings[2]), "the third start's targets were rebased"
print("batched disassembly ok", [len(listing) for listing in listings])
"""


def test_batched_raw_disassembly_lists_each_kernel_as_its_own_cubin_does(tmp_path):
    """disassemble() reads several kernels' code laid end to end in one nvdisasm call: each kernel's listing,
    addresses and code targets (branches, BSSY) taken back to its own start, equals nvdisasm's of its cubin. (In a
    subprocess: the kernels must be imported without TRITON_INTERPRET.)"""
    result = _python("-c", _BATCHED_DISASSEMBLY_CHECK, str(SCRIPT), str(tmp_path), timeout=300)
    assert "batched disassembly ok" in result.stdout


_WGMMA_PIPELINE_CHECK = """
import importlib.util, sys

spec = importlib.util.spec_from_file_location("kernel_report", sys.argv[1])
kr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kr)
kr._init_worker(sys.argv[2])
wanted = {("attention_fwd", True, ""), ("attention_bwd_dq", False, ""), ("attention_bwd_dkdv", True, "L=100")}
jobs = [job for job in kr.collect_configs(("sm_90a",), ("bf16",), (64,), (768,),
                                          ["attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv"])
        if (job["kernel"], job["dropout"], job["variant"]) in wanted and not job["key_padding"]
        and not job["yardstick"]]
assert len(jobs) == 3, [(j["kernel"], j["dropout"], j["variant"]) for j in jobs]
for job, figures in zip(jobs, kr.compile_batch(jobs)):
    print(job["kernel"], job["variant"] or "L=128", "dropout" if job["dropout"] else "", figures["tensor_core_op"],
          "serialized" if figures["wgmma_serialized"] else "pipelined", f"loop mma.sync {figures['loop_mma_sync']}",
          figures["wgmma_serialized"] or "")
"""


def test_attention_kernels_keep_their_wgmma_pipelined_on_sm90a(tmp_path):
    """ptxas serialized every wgmma of these three kernels (C7515) while their accumulators started from tl.zeros:
    the forward with dropout, dQ, and dK/dV at an odd length with dropout (bf16, d64). See kernels/_common.py,
    accumulator_zeros. And every MMA of their loops is a wgmma: dK/dV's [queries, keys] tiles of 32 queries ran S
    and dP on mma.sync (16 HMMA a loop); its [keys, queries] tiles do not (_dkdv_tile)."""
    result = _python("-c", _WGMMA_PIPELINE_CHECK, str(SCRIPT), str(tmp_path), timeout=300)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3 and all(" wgmma pipelined loop mma.sync 0" in line for line in lines), result.stdout


def _load_kernel(tmp_path, name: str, body: str):
    """`kernel`, a triton.jit function with this body, from its own file (so only the body differs)."""
    path = tmp_path / f"{name}.py"
    path.write_text("import triton\nimport triton.language as tl\n\n\n"
                    f"def kernel(X, N: tl.constexpr):\n    {body}\n")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from triton.runtime.jit import JITFunction

    return JITFunction(module.kernel)


def test_the_cache_key_follows_the_launch_and_the_kernel_source(monkeypatch, tmp_path):
    """A cached figure is reused only for the same launch of the same kernel source with the same tools."""
    original = _load_kernel(tmp_path, "original", "tl.store(X, N)")
    edited = _load_kernel(tmp_path, "edited", "tl.store(X, N + 1)")
    job = {"module": "kernels.example", "attr": "kernel"}
    monkeypatch.setattr(kr, "_kernel_fn", lambda job: original)
    cached = kr.cache_file(tmp_path, job, "launch", "tools")
    assert cached.parent == tmp_path and cached.suffix == ".json"
    assert kr.cache_file(tmp_path, job, "launch", "tools") == cached  # stable
    assert kr.cache_file(tmp_path, job, "another launch", "tools") != cached
    assert kr.cache_file(tmp_path, job, "launch", "other tools") != cached
    monkeypatch.setattr(kr, "_kernel_fn", lambda job: edited)
    assert kr.cache_file(tmp_path, job, "launch", "tools") != cached


VARLEN_KERNELS = ["attention_fwd_varlen", "attention_bwd_dq_varlen", "attention_bwd_dkdv_varlen"]


def test_configs_include_the_varlen_kernels_and_leave_the_padded_ones_padded(monkeypatch):
    """The packed launches are recorded too (dropout on and off, VARLEN set); the padded launches have VARLEN off,
    so their compiles are the ones the padded path runs."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    jobs = kr.collect_configs(("sm_90a",), ("bf16",), (64,), (768,),
                              kernels=VARLEN_KERNELS + ["attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv"])
    varlen = [job for job in jobs if job["kernel"] in VARLEN_KERNELS]
    assert sorted((job["kernel"], job["dropout"]) for job in varlen) == sorted(
        (name, dropout) for name in VARLEN_KERNELS for dropout in (False, True))
    for job in varlen:
        assert job["kwargs"]["VARLEN"] is True and job["kwargs"]["HAS_KEY_BIAS"] is False
        assert job["variant"] == "varlen" and job["key_padding"] is None
        assert job["kwargs"]["DROPOUT"] == job["dropout"]
    padded = [job for job in jobs if job["kernel"] not in VARLEN_KERNELS and job["variant"] == ""]
    assert len(padded) == 15 and all(job["kwargs"].get("VARLEN", False) is False for job in padded)
    assert all(job["kwargs"]["EVEN_M"] and job["kwargs"]["EVEN_N"] for job in padded)  # L = 128
    odd = [job for job in jobs if job["variant"] == f"L={kr.ODD_SEQ_LEN}"]  # bf16 d64: the tails, padded layout
    assert sorted((job["kernel"], job["dropout"], job["key_padding"], job["yardstick"]) for job in odd) == sorted(
        [(name, dropout, kpad, False) for name in ("attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv")
         for dropout in (False, True) for kpad in (False, True)]
        + [(name, False, False, True) for name in ("attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv")])
    assert not any(job["kwargs"]["EVEN_M"] or job["kwargs"]["EVEN_N"] or job["kwargs"]["VARLEN"] for job in odd)


def test_each_arch_records_the_tiles_chosen_for_it(monkeypatch):
    """Launches are recorded per arch (inside simulated_gpu): a head dim whose tiles differ between sm_90 and sm_80
    is compiled with each arch's own tiles and warps."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    jobs = kr.collect_configs(("sm_90a", "sm_80"), ("bf16",), (64, 128), (768,),
                              kernels=["attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv"])
    tiles = {(job["kernel"], job["arch"], job["head_dim"]): (job["kwargs"]["BLOCK_M"], job["kwargs"]["BLOCK_N"],
                                                             job["kwargs"]["num_warps"])
             for job in jobs if not job["dropout"] and not job["key_padding"] and not job["yardstick"]}
    assert tiles[("attention_bwd_dq", "sm_90a", 64)] == (128, 32, 8)
    assert tiles[("attention_bwd_dq", "sm_80", 64)] == (64, 32, 8)
    assert tiles[("attention_bwd_dkdv", "sm_90a", 128)] == (16, 64, 4)
    assert tiles[("attention_bwd_dkdv", "sm_80", 128)] == (64, 64, 8)
    layouts = {(job["arch"], job["kwargs"]["KEYS_MAJOR"]) for job in jobs if job["kernel"] == "attention_bwd_dkdv"}
    assert layouts == {("sm_90a", True), ("sm_80", False)}  # dK/dV's [keys, queries] tiles on wgmma only
    assert tiles[("attention_fwd", "sm_90a", 128)] == (64, 64, 8)
    assert tiles[("attention_fwd", "sm_80", 128)] == (64, 64, 4)


_FP32_TILES_CHECK = """
import sys
from pathlib import Path

sys.path.insert(0, str(Path(sys.argv[1]).parent))  # importable by name: the compile workers unpickle its functions
import kernel_report as kr

jobs = []
for arch, d in (("sm_90a", 128), ("sm_80", 128), ("sm_86", 128), ("sm_86", 64)):
    for job in kr.collect_configs((arch,), ("fp32",), (d,), (768,), ["attention_fwd", "attention_bwd_dq",
                                                                    "attention_bwd_dkdv", "attention_bwd_dkdv_varlen",
                                                                    "attention_bwd_dq_varlen"]):
        if job["dropout"] and job["key_padding"] is not False and not job["yardstick"]:
            jobs.append(job)
rows, _, _ = kr.run(jobs, 2, progress=False)
for row in rows:
    print(row["kernel"], row["arch"], row["head_dim"], row["block_m"], row["block_n"], row["num_warps"],
          row["num_stages"], "spill", row["spill_bytes"], "smem", row["smem_bytes"], "blocks", row["blocks_per_sm"])
"""


def test_float32_tiles_fit_shared_memory_without_spills():
    """fp32 (TF32) doubles the shared memory of each pipeline stage: with the 16-bit tiles, every pass at d 128
    needed more than an A100 block holds (and the forward more than an H100's), and d 64's forward more than
    sm_86's 99 KB: the launch failed. fp32's own tiles (_TILES_FP32) compile to at least one block per SM with no
    spills, with dropout and key padding (the most registers), padded and packed."""
    result = _python("-c", _FP32_TILES_CHECK, str(SCRIPT), timeout=400)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4 * 5, result.stdout
    for line in lines:
        fields = line.split()
        assert int(fields[fields.index("spill") + 1]) == 0 and int(fields[fields.index("blocks") + 1]) >= 1, line


def test_every_launch_asks_for_fma_contraction_itself(monkeypatch):
    """Each kernel launch passes enable_fp_fusion=True (kernels/_common.FP_FUSION), so its compile keeps FFMA when
    triton's default turns it off (TRITON_DEFAULT_FP_FUSION=0 here, the default of triton 3.10)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
    jobs = kr.collect_configs(("sm_90a",), ("bf16",), (64,), (768,))
    kernels = {job["kernel"] for job in jobs}
    assert {"attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv", "attention_bias_expand",
            "attention_dropout_mask", "attention_bwd_dtable", "layer_norm_fwd", "layer_norm_bwd", "film_fwd",
            "film_bwd", "film_bwd_shared", "adapter_fwd"} <= kernels
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 32))
    assert backend.parse_options({}).enable_fp_fusion is False  # what a launch without the flag would get
    for name in sorted(kernels):
        job = next(job for job in jobs if job["kernel"] == name)
        assert job["kwargs"].get("enable_fp_fusion") is True, name
        assert backend.parse_options(job["kwargs"]).enable_fp_fusion is True, name


def test_sm86_tiles_fit_its_99_kb_of_shared_memory(tmp_path):
    """On sm_86 (A10, RTX 30xx: 99 KB of shared memory per block) the d128 dK/dV kernel, the largest in shared
    memory, compiles within 99 KB with no spills, dropout and key padding on or off (3 stages of sm_80's tiles need
    up to 138 KB: the launch would fail). The report's real path, in a subprocess (no interpreter)."""
    result = _python(str(SCRIPT), "--out", str(tmp_path), "--arch", "sm_86", "--dtype", "bf16", "--head-dim", "128",
                     "--hidden", "768", "--kernel", "attention_bwd_dkdv", "--no-progress", "--jobs", "2")
    rows = json.loads((tmp_path / "kernel-report.json").read_text())["rows"]
    assert len(rows) == 5 and {r["arch"] for r in rows} == {"sm_86"}
    for row in rows:
        assert row["num_stages"] == 2 and row["smem_bytes"] <= 99 * 1024 and row["spill_bytes"] == 0, row
        assert row["tensor_core_op"] == "mma.sync"
