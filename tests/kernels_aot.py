"""Compile every Triton kernel (the expert formats', the decoder's, the routing model's) for one CUDA
architecture, ahead of time, with no GPU:
`python tests/kernels_aot.py 86` prints one line per kernel ("ok" or the compiler's error) and exits 1
when any fails. Run by test_formats_triton_compile.py in a process without TRITON_INTERPRET (Triton
decides at import whether its kernels compile or are interpreted)."""

from __future__ import annotations

import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tiermoe.formats import triton_kernels as tk
from tiermoe.models import fused
from tiermoe.routing import szd_kernel


def compile_for(target: GPUTarget, fn, types: dict[str, str], constants: dict) -> None:
    """Compile fn with its pointer and integer arguments of `types` (default: 32-bit integers) and its
    compile-time constants."""
    names = fn.arg_names
    signature = {n: "constexpr" if n in constants else types.get(n, "i32") for n in names}
    constexprs = {(names.index(n),): v for n, v in constants.items()}
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target)


def kernels(arch: int):
    """(name, kernel, argument types, constants) of every kernel launch shape the engine makes."""
    native = arch >= 89
    gemv = {"x_ptr": "*bf16", "id_ptr": "*i64", "table_ptr": "*i64", "w_ptr": "*bf16", "out_ptr": "*fp32"}
    sizes = {"K": 2048, "N": 768, "M": 2, "SPLIT": 4, "TOPK": 8, "BLOCK_K": 128, "BLOCK_N": 64}
    swiglu = {"BIAS": None, "BIAS_DT": tl.bfloat16, "LIMIT": None, "ALPHA": 1.0}
    gpt_oss = {"BIAS": 16384, "BIAS_DT": tl.bfloat16, "LIMIT": 7.0, "ALPHA": 1.702}  # biases, clamped GLU
    formats = {
        "dense": (tk._dense_gemv, {"W": 0, "W_DT": tl.bfloat16}),
        "int4": (tk._int4_gemv, {"QW": 0, "QZ": 1024, "SC": 2048, "SC_DT": tl.float16, "G": 128}),
        "fp8": (tk._fp8_gemv, {"W": 0, "S": 4096, "BO": 128, "BI": 128, "FP8_NATIVE": native}),
        "nvfp4": (tk._fp4_gemv, {"W": 0, "S": 4096, "G": 8192, "GS": 16, "E8M0": False, "GLOBAL": True, "FP8_NATIVE": native}),
        "mxfp4": (tk._fp4_gemv, {"W": 0, "S": 4096, "G": 0, "GS": 32, "E8M0": True, "GLOBAL": False, "FP8_NATIVE": native}),
    }  # fmt: skip
    for name, (fn, consts) in formats.items():
        gate_up = {**sizes, **consts, **swiglu, "ACT_SPLIT": 0, "WEIGHTED": False}
        down = {**sizes, **consts, "ACT_SPLIT": 4, "WEIGHTED": True}
        yield f"{name} gemv gate_up", fn, gemv, gate_up
        yield f"{name} gemv down", fn, {**gemv, "x_ptr": "*fp32"}, {**down, **swiglu}
        yield f"{name} gemv down gpt-oss", fn, {**gemv, "x_ptr": "*fp32"}, {**down, **gpt_oss}
    gemm = {
        "x_ptr": "*bf16", "tok_ptr": "*i64", "blk_slot_ptr": "*i32", "blk_start_ptr": "*i32", "blk_end_ptr": "*i32",
        "out_ptr": "*fp32", "qw_ptr": "*i32", "qz_ptr": "*i32", "sc_ptr": "*fp16", "w_ptr": "*u8", "s_ptr": "*fp32",
        "g_ptr": "*fp32", "b_ptr": "*bf16", "dst_ptr": "*i64", "rw_ptr": "*fp32",
    }  # fmt: skip
    blocks = {"K": 2048, "N": 768, "M": 2, "BLOCK_M": 16, "BLOCK_N": 64, "DOT_FP32": False}
    fp4 = {**gemm, "s_ptr": "*u8"}
    gemms = {
        "dense": (tk._dense_gemm, {**gemm, "w_ptr": "*bf16"}, {**blocks, "BLOCK_K": 64, "EXACT": False}),
        "int4": (tk._int4_gemm, gemm, {**blocks, "G": 128, "BLOCK_K": 128}),
        "fp8": (tk._fp8_gemm, gemm, {**blocks, "BO": 128, "BI": 128, "BLOCK_K": 128, "FP8_NATIVE": native}),
        "nvfp4": (tk._fp4_gemm, fp4, {**blocks, "GS": 16, "E8M0": False, "GLOBAL": True, "BLOCK_K": 128, "FP8_NATIVE": native}),
        "mxfp4": (tk._fp4_gemm, fp4, {**blocks, "GS": 32, "E8M0": True, "GLOBAL": False, "BLOCK_K": 128, "FP8_NATIVE": native}),
    }  # fmt: skip
    # gate_up: the hidden states in; down: the GLU of gate_up's float32 output in, each row scattered to its
    # pair's place times its routing weight (as _grouped launches them)
    gate_up = {"GLU": False, "SCATTER": False}
    down = {"GLU": True, "SCATTER": True}
    for name, (fn, types, consts) in gemms.items():
        dense = {k: v for k, v in consts.items() if name != "dense" or k != "DOT_FP32"}
        yield (
            f"{name} gemm gate_up",
            fn,
            types,
            {**dense, **gate_up, "BIAS": False, "LIMIT": None, "ALPHA": 1.0},
        )
        yield (
            f"{name} gemm down",
            fn,
            {**types, "x_ptr": "*fp32"},
            {**dense, **down, "BIAS": False, "LIMIT": None, "ALPHA": 1.0},
        )
        yield (
            f"{name} gemm down gpt-oss",
            fn,
            {**types, "x_ptr": "*fp32"},
            {**dense, **down, "BIAS": True, "LIMIT": 7.0, "ALPHA": 1.702},
        )
    fp32 = {**gemm, "x_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32"}  # fp32 experts: products in fp32
    consts = {**blocks, "BLOCK_K": 64, "EXACT": True, **gate_up, "BIAS": False, "LIMIT": None, "ALPHA": 1.0}
    yield "dense gemm fp32", tk._dense_gemm, fp32, {k: v for k, v in consts.items() if k != "DOT_FP32"}
    yield "read in place", tk._read_in_place, {"src_ptr": "*i64", "out_ptr": "*i32"}, {"BLOCK": 1024}
    pointers = ("table_ptr", "host_ptr", "id_ptr", "cand_ptr", "owner_ptr", "out_ptr", "record_ptr")
    stage = {**{n: "*i64" for n in pointers}, "lo": "i64", "hi": "i64", "staging_ptr": "i64"}
    for admit in (False, True):  # the in-place path's staging, and its admission into victim slots
        yield (
            f"plan stage{' admit' if admit else ''}",
            tk._plan_stage,
            stage,
            {"PAIRS": 16, "CANDS": 32, "ADMIT": admit, "RECORD": admit},
        )
    yield "sum rows", tk._sum_rows, {"x_ptr": "*fp32", "out_ptr": "*bf16"}, {"BLOCK": tk.SUM_BLOCK}
    yield from decoder_kernels()
    yield (
        "copy rows",
        tk._copy_rows,
        {"src_ptr": "*i64", "dst_ptr": "*i64"},
        {"WORDS": 1536, "BLOCK": tk.STAGE_BLOCK},
    )
    for pairs in (1, 128, 4096):  # the blocks of a decode step: one sequence at top-1 to 512 at top-8
        count = -(-pairs // tk.BLOCK_M) + pairs
        yield (
            f"find blocks {pairs}",
            tk._find_blocks,
            {"s_ptr": "*i64", "slot_ptr": "*i32", "start_ptr": "*i32", "end_ptr": "*i32"},
            {
                "BLOCK": max(2, triton.next_power_of_2(pairs)),
                "BLOCK_B": triton.next_power_of_2(count),
                "BLOCK_M": tk.BLOCK_M,
            },
        )


def decoder_kernels():
    """The decoder's decode-step kernels (models/fused.py) and the SZD routing step, as the engine launches
    them: Qwen3's shapes (head 128, 32 query heads on 4 key heads), gpt-oss's window and sinks."""
    attention = {
        "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "tables_ptr": "*i64", "positions_ptr": "*i64",
        "lengths_ptr": "*i64", "sinks_ptr": "*bf16", "out_ptr": "*bf16", "part_ptr": "*fp32", "scale": "fp32",
    }  # fmt: skip
    for split in (False, True):
        for window, sinks in ((False, False), (True, True)):
            yield (
                f"decode attention{' split' if split else ''}{' window sinks' if window else ''}",
                fused._decode_attention,
                attention if split else {**attention, "part_ptr": "*bf16"},
                {"D": 128, "G": 16, "BLOCK_N": 64, "BLOCK_D": 128, "PAGE": 16, "WINDOW": window,
                 "SINKS": sinks, "SPLIT": split, "DOT_FP32": False},
            )  # fmt: skip
    combine = {"part_ptr": "*fp32", "sinks_ptr": "*bf16", "out_ptr": "*bf16"}
    yield (
        "combine splits",
        fused._combine_splits,
        combine,
        {"D": 128, "BLOCK_S": 32, "BLOCK_D": 128, "SINKS": True},
    )
    rope = {
        n: "*bf16"
        for n in (
            "q_ptr",
            "k_ptr",
            "v_ptr",
            "cos_ptr",
            "sin_ptr",
            "qw_ptr",
            "kw_ptr",
            "qout_ptr",
            "kpool_ptr",
            "vpool_ptr",
        )
    }
    for norm in (False, True):
        yield (
            f"rope into cache{' norm' if norm else ''}",
            fused._rope_cache,
            {**rope, "slots_ptr": "*i64", "eps": "fp32"},
            {"D": 128, "HALF": 64, "BLOCK": 64, "NORM": norm, "FLOAT32_SCALE": False},
        )
    szd = {
        "seed_hash": "i64", "docs_ptr": "*i64", "rows_ptr": "*i64", "positions_ptr": "*i64", "valid_ptr": "*i1",
        "base_ptr": "*fp32", "z_ptr": "*fp32", "prev_ptr": "*i64", "ids_ptr": "*i64", "h_ptr": "*fp32",
        "phi": "fp32", "drift": "fp32", "sigma_loc": "fp32", "p_stick": "fp32",
    }  # fmt: skip
    yield "szd decode", szd_kernel._szd_decode, szd, {"EPS": 1, "GUMBEL": 2, "STICK": 3, "K": 8, "BLOCK": 128}


def main(arch: int) -> int:
    target, failed = GPUTarget("cuda", arch, 32), 0
    for name, fn, types, constants in kernels(arch):
        try:
            compile_for(target, fn, types, constants)
            print(f"sm_{arch} {name}: ok")
        except Exception as e:  # every kernel is tried; the report names each failure
            failed += 1
            print(f"sm_{arch} {name}: {type(e).__name__}: {str(e)[:600]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
