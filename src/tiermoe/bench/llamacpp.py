"""llama.cpp as a `tiermoe bench` peer: its MoE experts on the CPU (`--n-cpu-moe`), the rest on the GPU.

`--llama-cpp DIR` names an installation laid out as

  DIR/{.,bin,build/bin}/llama-bench, llama-quantize   a CUDA build (the tools' shared libraries beside them)
  DIR/{.,convert}/convert_hf_to_gguf.py               that source tree's converter, gguf-py/ (and the
                                                      conversion/ package it imports) beside it
  DIR/tokenizers/{qwen2,olmo}/                        optional: real tokenizers for checkpoints without one

The checkpoint is converted once to a GGUF (cached in a work dir, never written into the model folder):
bf16 from its safetensors, or, for `tiermoe synth --experts-in-memory` checkpoints whose experts are not on
disk, q8_0 with random weights drawn from config.json (the "base" format); `llama-quantize` may take
either to Q4_K_M (`--llama-cpp-formats base,q4_k_m` benches both). Then, per format, `llama-bench` times
three settings: every layer on the GPU (when it fits), the fitted split (the smallest `--n-cpu-moe N`
whose GPU share fits each capped budget) and every layer's experts on the CPU.

The converter runs in a child process of this module (`python -m tiermoe.bench.llamacpp convert`), where it
can be given random weights or a pre-tokenizer it does not know; `... prepare` converts without timing.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import mmap
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import user_cache_dir
from ..errors import InvalidRequestError, TiermoeError
from .shapes import bytes_per_element, checkpoint_size, tensor_specs
from .synth import INIT_STD, read_synth_info
from .synth_tokenizer import chatml_bpe
from .workload import Workload

ENGINE = "llama.cpp"
QUANT_TYPES = {"q4_k_m": "Q4_K_M"}  # --llama-cpp-formats name -> llama-quantize type
BASE = "base"  # the converter's own GGUF: bf16 from safetensors, q8_0 from random weights
FORMATS = (BASE, *QUANT_TYPES)
DEFAULT_WORK_DIR = user_cache_dir() / "gguf"
_GIB = 1 << 30
_MIB = 1 << 20
_BIN_DIRS = (".", "bin", "build/bin")
_CONVERTER_DIRS = (".", "convert")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin")
# The pre-tokenizer named when the converter does not know a tokenizer's hash (synth's own byte-level BPEs):
# GPT-2's split regex, which a ByteLevel pre-tokenizer uses. Only token ids matter to llama-bench.
_FALLBACK_PRE_TOKENIZER = "gpt-2"
# Bytes per parameter of each GGUF type, to check the disk before converting (Q4_K_M: about 4.9 bits).
_GGUF_BYTES_PER_PARAM = {"bf16": 2.0, "q8_0": 34 / 32, "q4_k_m": 0.62}


class LlamaCppError(TiermoeError):
    """Converting to GGUF or running a llama.cpp tool failed; the bench records it as the peer's error."""


# ---------------------------------------------------------------------------------------- installation


@dataclass(frozen=True)
class LlamaCppDir:
    """Where the tools of one llama.cpp installation are."""

    root: Path
    llama_bench: Path
    llama_quantize: Path
    converter: Path  # convert_hf_to_gguf.py
    tokenizers: Path | None  # tokenizers/: qwen2/ and olmo/, each a Hugging Face tokenizer folder

    def env(self) -> dict[str, str]:
        """Environment for the binaries: their RUNPATH names the folder they were built in, and
        libggml-cuda needs CUDA's runtime and cuBLAS, which may come from pip's nvidia wheels only."""
        dirs = [self.llama_bench.parent, *_cuda_library_dirs()]
        old = os.environ.get("LD_LIBRARY_PATH")
        return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join([*map(str, dirs), *([old] if old else [])])}


def _cuda_library_dirs() -> list[Path]:
    roots = [Path("/usr/local/cuda/lib64")]
    with contextlib.suppress(ImportError):
        import nvidia  # namespace package of the CUDA wheels (nvidia/cu13/lib, nvidia/cublas/lib, ...)

        roots += [p.parent for r in nvidia.__path__ for p in Path(r).glob("*/lib/libcu*.so*")]
    return [d for d in dict.fromkeys(roots) if d.is_dir()]


def _first(root: Path, subdirs: tuple[str, ...], name: str) -> Path | None:
    return next((root / d / name for d in subdirs if (root / d / name).is_file()), None)


def locate(root: str | Path) -> LlamaCppDir:
    """The llama.cpp installation in `root`; one InvalidRequestError names everything missing."""
    root = Path(root).expanduser().resolve()
    missing = []
    bins = {}
    for tool in ("llama-bench", "llama-quantize"):
        bins[tool] = _first(root, _BIN_DIRS, tool)
        if bins[tool] is None or not os.access(bins[tool], os.X_OK):
            missing.append(f"the executable {tool} (in DIR, DIR/bin or DIR/build/bin)")
    converter = _first(root, _CONVERTER_DIRS, "convert_hf_to_gguf.py")
    if converter is None:
        missing.append("convert_hf_to_gguf.py (in DIR or DIR/convert)")
    else:
        # Newer trees split the converter into a conversion/ package; older ones are one file.
        needs = ["gguf-py"] + (["conversion"] if "from conversion" in converter.read_text() else [])
        missing += [
            f"{converter.parent / d}/ beside the converter"
            for d in needs
            if not (converter.parent / d).is_dir()
        ]
    if missing:
        raise InvalidRequestError(
            f"--llama-cpp {root} is not a llama.cpp installation: missing {'; '.join(missing)}. "
            "Layout: DIR/bin/llama-bench, DIR/bin/llama-quantize, DIR/convert/convert_hf_to_gguf.py with "
            "gguf-py/ and conversion/ beside it (bench/README.md, 'The llama.cpp peer').",
            param="llama_cpp",
        )
    tokenizers = root / "tokenizers" if (root / "tokenizers").is_dir() else None
    return LlamaCppDir(root, bins["llama-bench"], bins["llama-quantize"], converter, tokenizers)


@dataclass(frozen=True)
class LlamaCppOptions:
    """How the bench runs the llama.cpp peer."""

    install: LlamaCppDir
    work_dir: Path = DEFAULT_WORK_DIR  # cached GGUFs, staging folders, converter logs
    formats: tuple[str, ...] = (BASE,)  # GGUFs to bench, each FORMATS: the base one, llama-quantize'd copies
    # The checkpoint llama.cpp converts, when not the bench's --model: the unquantized checkpoint that a
    # quantized one tiermoe runs was made from (llama.cpp quantizes its own way, from bf16 or q8_0).
    source: Path | None = None
    cuda_context_gib: float = 0.5  # outside llama.cpp's own buffers: 0.3-0.6 GiB measured on an H100
    convert_timeout_s: float = 3600.0  # Qwen3-30B-A3B's random q8_0 GGUF took about 7 minutes

    def __post_init__(self):
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise InvalidRequestError(
                f"--llama-cpp-formats takes a comma-separated list of {', '.join(FORMATS)}, got "
                f"{','.join(self.formats) or 'nothing'!r}",
                param="llama_cpp_formats",
            )


def parse_formats(text: str | None) -> tuple[str, ...]:
    """`--llama-cpp-formats base,q4_k_m` -> ("base", "q4_k_m"); None: the base GGUF alone."""
    return (BASE,) if text is None else tuple(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))


def options(
    llama_cpp_dir: str | Path | None, formats: str | None = None, source: str | Path | None = None
) -> LlamaCppOptions | None:
    """The bench's llama.cpp options from `--llama-cpp DIR`, `--llama-cpp-formats` and
    `--llama-cpp-source`; None without DIR."""
    if llama_cpp_dir is None:
        return None
    return LlamaCppOptions(
        locate(llama_cpp_dir), formats=parse_formats(formats), source=source and Path(source)
    )


# ---------------------------------------------------------------------------------------- conversion


@dataclass(frozen=True)
class Gguf:
    path: Path
    dtype: str  # bf16, q8_0 or q4_k_m
    weights: str  # "checkpoint" (converted from its safetensors) or "random" (drawn from config.json)


def _cache_key(model_dir: Path) -> str:
    """Changes when the checkpoint does: its config, synth's record (seed, date) and weight file sizes."""
    h = hashlib.sha1()
    for f in sorted(model_dir.iterdir()):
        if f.name in ("config.json", "tiermoe_synth.json"):
            h.update(f.read_bytes())
        elif f.name.endswith(_WEIGHT_SUFFIXES):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:10]


def _check_disk(work_dir: Path, config: dict, dtype: str) -> None:
    params = checkpoint_size(config).total_bytes / bytes_per_element(config)
    need, free = params * _GGUF_BYTES_PER_PARAM[dtype], shutil.disk_usage(work_dir).free
    if free < need + _GIB:
        raise LlamaCppError(
            f"disk: {work_dir} has {free / _GIB:.1f} GiB free, a {dtype} GGUF needs about {need / _GIB:.1f} GiB"
        )


def _tokenizer_source(install: LlamaCppDir, vocab_size: int) -> Path | None:
    """The installation's real tokenizer for this vocabulary: Qwen2/3's BPE (151,936 ids) or OLMo's
    (50,280 ids, OLMoE pads to 50,304). Their pre-tokenizers are ones the converter knows."""
    name = "qwen2" if vocab_size >= 151936 else "olmo" if vocab_size >= 50280 else None
    if name is None or install.tokenizers is None:
        return None
    return install.tokenizers / name if (install.tokenizers / name / "tokenizer.json").is_file() else None


def _stage(model_dir: Path, stage: Path, install: LlamaCppDir, random: bool) -> None:
    """A folder of links to the checkpoint's files (no weights when they are drawn at random) plus a
    tokenizer when it has none: the converter needs one, and the model folder is not ours to write."""
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.is_file() and not (random and f.name.endswith(_WEIGHT_SUFFIXES)):
            (stage / f.name).symlink_to(f.resolve())
    if any((model_dir / t).exists() for t in _TOKENIZER_FILES):
        return
    vocab_size = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
    source = _tokenizer_source(install, vocab_size)
    if source is not None:
        for f in source.iterdir():
            shutil.copy2(f, stage / f.name)
        return
    # A byte-level BPE trained in milliseconds (the demo's); the converter pads the vocabulary to the
    # config's size.
    chatml_bpe(vocab_size).save_pretrained(stage)


def _run_tool(cmd: list[str], timeout_s: float, log: Path, env: dict | None = None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with log.open("w") as out:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise LlamaCppError(
            f"{Path(cmd[0]).name} {cmd[1]}: timed out after {timeout_s:g} s (log: {log})"
        ) from None
    if proc.returncode != 0:
        lines = log.read_text(errors="replace").strip().splitlines()
        raise LlamaCppError(
            f"exit code {proc.returncode}: {lines[-1] if lines else 'no output'} (log: {log})"
        )


def _convert(model_dir: Path, out: Path, dtype: str, random: bool, options: LlamaCppOptions) -> None:
    stage = options.work_dir / "stage" / out.stem
    _stage(model_dir, stage, options.install, random)
    part = out.with_name(out.name + ".part")  # a GGUF appears whole or not at all
    cmd = [
        sys.executable, "-m", "tiermoe.bench.llamacpp", "convert", "--converter", str(options.install.converter),
        "--model", str(stage), "--outfile", str(part), "--outtype", dtype, "--pre-tokenizer", _FALLBACK_PRE_TOKENIZER,
    ]  # fmt: skip
    if random:
        cmd += ["--random-seed", str(read_synth_info(model_dir).get("seed", 0))]
    src = str(Path(__file__).resolve().parents[2])  # the child must import this same tiermoe
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    try:
        _run_tool(cmd, options.convert_timeout_s, out.with_suffix(".log"), env)
        part.replace(out)
    finally:
        part.unlink(missing_ok=True)
        shutil.rmtree(stage, ignore_errors=True)


def prepare_gguf(
    model_dir: str | Path, options: LlamaCppOptions, progress: Callable[[str], None] = print, fmt: str = BASE
) -> Gguf:
    """The checkpoint's GGUF in format `fmt` (FORMATS), converted (and quantized) on the first call, found
    in the cache after."""
    model_dir = Path(model_dir).resolve()
    config = json.loads((model_dir / "config.json").read_text())
    # Experts generated in memory are on no disk: draw every weight from config.json instead, as q8_0,
    # since a bf16 Qwen3-30B-A3B GGUF (57 GiB) does not fit the bench machine's disk.
    random = bool(read_synth_info(model_dir).get("experts_in_memory"))
    base_dtype = "q8_0" if random else "bf16"
    stem = f"{model_dir.name}-{_cache_key(model_dir)}"
    options.work_dir.mkdir(parents=True, exist_ok=True)
    base = options.work_dir / f"{stem}-{base_dtype}.gguf"
    if not base.exists():
        _check_disk(options.work_dir, config, base_dtype)
        how = "random weights from config.json" if random else "its safetensors"
        progress(
            f"bench: llama.cpp: converting {model_dir.name} to a {base_dtype} GGUF from {how} (cached after)"
        )
        _convert(model_dir, base, base_dtype, random, options)
    weights = "random" if random else "checkpoint"
    if fmt == BASE:
        return Gguf(base, base_dtype, weights)
    out = options.work_dir / f"{stem}-{fmt}.gguf"
    if not out.exists():
        _check_disk(options.work_dir, config, fmt)
        progress(f"bench: llama.cpp: llama-quantize {base.name} to {QUANT_TYPES[fmt]}")
        part = out.with_name(out.name + ".part")
        # --allow-requantize: the input may be q8_0 (the random-weight path) rather than bf16
        cmd = [
            str(options.install.llama_quantize), "--allow-requantize", str(base), str(part),
            QUANT_TYPES[fmt], str(os.cpu_count() or 1),
        ]  # fmt: skip
        try:
            _run_tool(cmd, options.convert_timeout_s, out.with_suffix(".log"), options.install.env())
            part.replace(out)
        finally:
            part.unlink(missing_ok=True)
    return Gguf(out, fmt, weights)


# ---------------------------------------------------------------------------------------- the GPU split

# ggml type id -> (elements per block, bytes per block), as gguf-py's GGML_QUANT_SIZES lists them.
_GGML_BLOCKS = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17),
}  # fmt: skip
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
_GGUF_STRING, _GGUF_ARRAY = 8, 9
# The tensors --n-cpu-moe N keeps on the CPU for layers < N (llama.cpp's LLM_FFN_EXPS_REGEX).
_EXPERTS = re.compile(r"blk\.(\d+)\.ffn_(up|down|gate|gate_up)_(ch|)exps\.")
# llama.cpp's CUDA compute buffer beyond the logits: an estimate checked against its "CUDA0 compute
# buffer size" log lines on OLMoE-1B-7B.
_COMPUTE_BASE_BYTES = 192 * _MIB


class _GgufHeader:
    """The key-value metadata and tensor table at the start of a GGUF (v2/v3, little-endian)."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 4
        if bytes(buf[:4]) != b"GGUF":
            raise LlamaCppError("not a GGUF file (no GGUF magic)")
        version = self._take("<I")
        if version not in (2, 3):
            raise LlamaCppError(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = self._take("<Q"), self._take("<Q")
        self.fields = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._take("<I"))
        self.tensors = []  # (name, bytes)
        for _ in range(n_tensors):
            name, dims = self._string(), [self._take("<Q") for _ in range(self._take("<I"))]
            ggml_type, _offset = self._take("<I"), self._take("<Q")
            if ggml_type not in _GGML_BLOCKS:
                raise LlamaCppError(f"tensor {name}: ggml type {ggml_type} is not in the size table")
            block, nbytes = _GGML_BLOCKS[ggml_type]
            numel = 1
            for d in dims:
                numel *= d
            self.tensors.append((name, numel // block * nbytes))

    def _take(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._take("<Q")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8", "replace")

    def _value(self, vtype: int):
        if vtype == _GGUF_STRING:
            return self._string()
        if vtype == _GGUF_ARRAY:
            item_type, n = self._take("<I"), self._take("<Q")
            return tuple(self._value(item_type) for _ in range(n))
        return self._take(_GGUF_SCALARS[vtype])


@dataclass(frozen=True)
class GgufLayout:
    """What decides llama.cpp's GPU share: bytes per tensor group and the KV cache's size per token."""

    arch: str
    n_layer: int
    n_vocab: int
    expert_bytes: tuple[int, ...]  # per layer: the tensors --n-cpu-moe moves to the CPU
    dense_gpu_bytes: int  # every other tensor but token_embd, which llama.cpp keeps on the CPU
    cpu_bytes: int  # token_embd
    kv_bytes_per_token: int  # f16 K and V of every layer

    @property
    def gpu_gib_all(self) -> float:
        return (self.dense_gpu_bytes + sum(self.expert_bytes)) / _GIB


def read_layout(path: str | Path) -> GgufLayout:
    """Tensor sizes and attention shape from a GGUF's header (the tensor data is not read)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        header = _GgufHeader(buf)
    kv = header.fields
    arch = kv["general.architecture"]
    n_layer, n_embd = int(kv[f"{arch}.block_count"]), int(kv[f"{arch}.embedding_length"])
    n_head = int(kv[f"{arch}.attention.head_count"])
    n_head_kv = kv.get(f"{arch}.attention.head_count_kv", n_head)
    n_head_kv = max(n_head_kv) if isinstance(n_head_kv, tuple) else int(n_head_kv)  # per-layer in some archs
    k_len = int(kv.get(f"{arch}.attention.key_length", n_embd // n_head))
    v_len = int(kv.get(f"{arch}.attention.value_length", n_embd // n_head))
    n_vocab = len(kv.get("tokenizer.ggml.tokens", ())) or int(kv.get(f"{arch}.vocab_size", 0))
    experts, dense, cpu = [0] * n_layer, 0, 0
    for name, nbytes in header.tensors:
        if m := _EXPERTS.match(name):
            experts[int(m.group(1))] += nbytes
        elif name.startswith("token_embd."):
            cpu += nbytes
        else:
            dense += nbytes
    return GgufLayout(
        arch, n_layer, n_vocab, tuple(experts), dense, cpu, n_layer * n_head_kv * (k_len + v_len) * 2
    )


def gpu_bytes(layout: GgufLayout, n_cpu_moe: int, prompt_len: int, gen_len: int) -> int:
    """llama.cpp's GPU memory with -ngl 99 --n-cpu-moe N, the CUDA context left out: the tensors it
    offloads, minus the experts of layers < N, plus the KV cache and compute buffer of the largest of
    llama-bench's contexts (one per test: prompt_len for pp, gen_len for tg; padded to 256 tokens)."""
    tokens = max(prompt_len, gen_len)
    n_ctx, n_ubatch = -(-tokens // 256) * 256, min(512, tokens)
    compute = n_ubatch * layout.n_vocab * 4 + _COMPUTE_BASE_BYTES  # f32 logits of one micro-batch
    kv = n_ctx * layout.kv_bytes_per_token
    return layout.dense_gpu_bytes + sum(layout.expert_bytes[n_cpu_moe:]) + kv + compute


def fit_n_cpu_moe(
    layout: GgufLayout, gpu_budget_gib: float, prompt_len: int, gen_len: int, cuda_context_gib: float
) -> int | None:
    """The smallest N whose GPU share, with the CUDA context, fits the budget; None if none does."""
    room = (gpu_budget_gib - cuda_context_gib) * _GIB
    fits = (n for n in range(layout.n_layer + 1) if gpu_bytes(layout, n, prompt_len, gen_len) <= room)
    return next(fits, None)


# ---------------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Setting:
    """One llama-bench run: a name, the budget the split was fitted to, and N (None: skipped, why)."""

    name: str  # "all-gpu", "fit" or "experts-cpu"
    gpu_budget_gib: float | None
    n_cpu_moe: int | None
    skip: str | None = None


def plan_settings(
    layout: GgufLayout,
    gpu_budgets: list[float | None],
    gpu_total_gib: float,
    workload: Workload,
    cuda_context_gib: float,
) -> list[Setting]:
    """All layers on the GPU, the fitted split at every capped budget, all experts on the CPU."""
    need = gpu_bytes(layout, 0, workload.prompt_len, workload.gen_len) / _GIB + cuda_context_gib
    all_gpu = Setting("all-gpu", None, 0)
    if need > gpu_total_gib:
        all_gpu = Setting(
            "all-gpu", None, None, f"needs about {need:.1f} GiB, the GPU has {gpu_total_gib:.1f} GiB"
        )
    settings = [all_gpu]
    for budget in [b for b in gpu_budgets if b is not None]:
        n = fit_n_cpu_moe(layout, budget, workload.prompt_len, workload.gen_len, cuda_context_gib)
        least = (
            gpu_bytes(layout, layout.n_layer, workload.prompt_len, workload.gen_len) / _GIB + cuda_context_gib
        )
        reason = (
            None if n is not None else f"even with every expert on the CPU it needs about {least:.1f} GiB"
        )
        settings.append(Setting("fit", budget, n, reason))
    return [*settings, Setting("experts-cpu", None, layout.n_layer)]


def bench_command(llama_bench: Path, gguf: Path, workload: Workload, n_cpu_moe: int) -> list[str]:
    """llama-bench at batch 1: a prompt_len prompt test and a gen_len generation test, each repeated
    (after its warm-up); -ngl 99 offloads every layer, --n-cpu-moe then keeps the experts of the first
    N on the CPU, where -lm none (no mmap) puts them in pinned memory."""
    return [
        str(llama_bench), "-m", str(gguf), "-p", str(workload.prompt_len), "-n", str(workload.gen_len),
        "-r", str(workload.repeat), "-o", "json", "-ngl", "99", "-lm", "none", "--n-cpu-moe", str(n_cpu_moe),
    ]  # fmt: skip


def parse_bench_json(text: str) -> dict:
    """Figures from llama-bench's `-o json` list: `avg_ts` of the pp test (prompt tokens / time) and of
    the tg test (generated tokens / time, each decoded alone), their samples, and the build."""
    rows = json.loads(text)
    pp = next((r for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0), None)
    tg = next((r for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0), None)
    if pp is None or tg is None:
        raise LlamaCppError(f"llama-bench gave no {'pp' if pp is None else 'tg'} test in its JSON")
    return {
        "prefill_tok_s": pp["avg_ts"],
        "decode_tok_s": tg["avg_ts"],
        "samples": [
            {"prefill_tok_s": p, "decode_tok_s": d}
            for p, d in zip(pp["samples_ts"], tg["samples_ts"], strict=False)
        ],
        "build": f"build {tg['build_number']}, commit {tg['build_commit']}",
        "llama_bench": {
            k: tg.get(k)
            for k in ("n_threads", "flash_attn", "n_gpu_layers", "load_mode", "gpu_info", "cpu_info")
        },
    }


def _nvidia_smi(query: str) -> list[float] | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        return [float(v) for v in out.stdout.split()] if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None


@contextlib.contextmanager
def _gpu_used_mib() -> Iterator[dict]:
    """GPU 0's used memory above what it was before, sampled by nvidia-smi every 250 ms while the block
    runs: the whole process (CUDA context included), as tiermoe's own figure is not. {} without nvidia-smi."""
    found: dict = {}
    base, sampler = _nvidia_smi("memory.used"), None
    cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0", "-lms", "250"]
    if base is not None:
        with contextlib.suppress(OSError):
            sampler = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if sampler is None:
        yield found
        return
    try:
        yield found
    finally:
        sampler.terminate()
        try:
            out, _ = sampler.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            sampler.kill()
            out, _ = sampler.communicate()
        values = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]
        # No sample above the base: a run shorter than the sampling period (a tiny model), read nothing.
        if values and max(values) > base[0]:
            found["peak_mib"] = max(values) - base[0]


def llama_cpp_version(install: LlamaCppDir) -> str | None:
    """`llama-bench --version`'s line, e.g. "0.5.0-dev (build 0, commit unknown)"."""
    try:
        cmd = [str(install.llama_bench), "--version"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=install.env())
    except (OSError, subprocess.TimeoutExpired):
        return None
    line = next((ln for ln in (out.stderr + out.stdout).splitlines() if ln.startswith("version:")), None)
    return line.removeprefix("version:").strip() if line else None


def _time(cmd: list[str], timeout_s: float, env: dict) -> dict:
    """One llama-bench run's figures, or {"error": ...}."""
    with _gpu_used_mib() as used:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:g} s"}
        except OSError as e:
            return {"error": f"cannot run llama-bench: {e}"}
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"error": f"exit code {proc.returncode}: {lines[-1] if lines else 'no output'}"}
    try:
        figures = parse_bench_json(proc.stdout)
    except (ValueError, KeyError, LlamaCppError) as e:
        return {"error": f"unreadable llama-bench JSON: {e}"}
    return {**figures, "peak_gpu_gib": used["peak_mib"] / 1024 if "peak_mib" in used else None}


def runs(
    model_dir: str | Path,
    workload: Workload,
    gpu_budgets: list[float | None],
    options: LlamaCppOptions,
    timeout_s: float = 600,
    progress: Callable[[str], None] = print,
) -> list[dict]:
    """llama.cpp's run dicts in the bench's schema (report.RUN_KEYS plus peer_flags, llama_cpp_version,
    llama_cpp_format, n_cpu_moe, gguf, ...), per GGUF format of the options: all on the GPU, the fitted
    split per capped budget, all experts on the CPU. A failure becomes that run's `error`; nothing here
    raises for a peer that does not work."""
    model_dir = Path(options.source or model_dir)
    caps = [b for b in gpu_budgets if b is not None]
    base = {
        "engine": ENGINE, "model_preset": read_synth_info(model_dir).get("preset", model_dir.name),
        "experts_dtype": None, "gpu_budget_gib": None, "cpu_budget_gib": None, "batch": 1,
        "prompt_len": workload.prompt_len, "gen_len": workload.gen_len, "repeat": workload.repeat,
        "prefill_tok_s": None, "decode_tok_s": None, "ttft_s": None, "peak_gpu_gib": None,
        "peer_flags": None, "llama_cpp_version": None, "llama_cpp_format": None, "llama_cpp_setting": None,
        "n_cpu_moe": None, "n_layer": None, "plan_gpu_gib": None, "gguf": None, "gguf_weights": None,
        "error": None,
    }  # fmt: skip

    def failed(fmt: str, reason: str) -> list[dict]:
        names = [("all-gpu", None), *[("fit", b) for b in caps], ("experts-cpu", None)]
        return [
            {**base, "llama_cpp_format": fmt, "llama_cpp_setting": n, "gpu_budget_gib": b, "error": reason}
            for n, b in names
        ]

    total = _nvidia_smi("memory.total")
    if total is None:
        reason = "skipped: no NVIDIA GPU (nvidia-smi answered nothing); this peer is a CUDA build"
        return [r for fmt in options.formats for r in failed(fmt, reason)]
    version = llama_cpp_version(options.install)
    results = []
    for fmt in options.formats:
        try:
            gguf = prepare_gguf(model_dir, options, progress, fmt)
            layout = read_layout(gguf.path)
        except (TiermoeError, OSError, ValueError) as e:
            results += failed(fmt, f"no GGUF: {e}")
            continue
        common = dict(
            base, experts_dtype=gguf.dtype, llama_cpp_format=fmt, gguf=str(gguf.path),
            gguf_weights=gguf.weights, n_layer=layout.n_layer,
        )  # fmt: skip
        for s in plan_settings(layout, gpu_budgets, total[0] / 1024, workload, options.cuda_context_gib):
            run = dict(
                common, llama_cpp_setting=s.name, gpu_budget_gib=s.gpu_budget_gib, n_cpu_moe=s.n_cpu_moe
            )
            if s.n_cpu_moe is None:
                results.append({**run, "error": f"skipped: {s.skip}"})
                continue
            cmd = bench_command(options.install.llama_bench, gguf.path, workload, s.n_cpu_moe)
            plan = gpu_bytes(layout, s.n_cpu_moe, workload.prompt_len, workload.gen_len) / _GIB
            progress(
                f"bench: llama.cpp {gguf.dtype} {s.name}: --n-cpu-moe {s.n_cpu_moe}/{layout.n_layer}, "
                f"GPU plan {plan:.2f} GiB"
            )
            figures = _time(cmd, timeout_s, options.install.env())
            if figures.get("error"):
                progress(f"bench: llama.cpp: {figures['error']}")
            build = figures.pop(
                "build", None
            )  # the JSON's build number and commit, if --version said nothing
            run.update(figures, peer_flags=shlex.join(cmd[1:]), plan_gpu_gib=plan)
            run["llama_cpp_version"] = version or build
            if run["peak_gpu_gib"] is None and not run["error"]:  # nvidia-smi read nothing: the plan's figure
                run["peak_gpu_gib"] = plan + options.cuda_context_gib
            results.append(run)
    return results


# ---------------------------------------------------------------------------------------- child process


def _random_weights(model_dir: Path, seed: int, lazy_tensor: type) -> dict[str, Callable]:
    """{checkpoint name: lazy tensor} for every tensor config.json implies, drawn when the converter
    writes it: normal(0, INIT_STD), norms ones, biases zeros, seeded per name as synth does. On the GPU
    when there is one (normal_ over 30B values on the CPU takes longer than the bench allows)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def draw(spec) -> torch.Tensor:
        if spec.init != "normal":
            return (torch.ones if spec.init == "ones" else torch.zeros)(spec.shape, dtype=torch.bfloat16)
        gen = torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}:{spec.name}".encode()))
        t = torch.empty(spec.shape, dtype=torch.bfloat16, device=device)
        return t.normal_(0.0, INIT_STD, generator=gen).cpu()

    def lazy(spec):
        meta = lazy_tensor.meta_with_dtype_and_shape(torch.bfloat16, spec.shape)
        return lazy_tensor(meta=meta, args=(spec,), func=draw)

    config = json.loads((model_dir / "config.json").read_text())
    return {spec.name: (lambda spec=spec: lazy(spec)) for spec in tensor_specs(config)}


_Q8_0_BLOCK = 32
_Q8_0_CHUNK_BLOCKS = 1 << 21  # 64M values, 256 MB of float32, per pass


def q8_0_blocks(values):
    """ggml's Q8_0 of a float32 array whose last dimension is a multiple of 32: per block of 32 values,
    the scale d = max|x| / 127 as float16, then round(x / d) as int8, rounding half away from zero as
    ggml's roundf does. Bit for bit gguf-py's Q8_0.quantize_blocks, in torch on the GPU when there is
    one: gguf-py's numpy runs on one core, which made Qwen3-30B-A3B's 32 GB GGUF take 7 minutes."""
    import numpy as np
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(-1, _Q8_0_BLOCK)
    out = torch.empty(x.shape[0], 2 + _Q8_0_BLOCK, dtype=torch.uint8)  # [n_blocks, d (2 bytes) + 32 qs]
    for start in range(0, x.shape[0], _Q8_0_CHUNK_BLOCKS):
        blocks = x[start : start + _Q8_0_CHUNK_BLOCKS].to(device)
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        scaled = blocks * torch.where(d == 0, 0.0, 1 / d)
        # roundf as gguf-py's np_roundf computes it: floor(|x|) + floor(2 * frac(|x|)), x's sign
        q = scaled.abs()
        floored = q.floor()
        q.sub_(floored).mul_(2).floor_().add_(floored).copysign_(scaled)
        packed = torch.cat([d.half().view(torch.uint8), q.to(torch.int8).view(torch.uint8)], dim=1)
        out[start : start + len(blocks)] = packed.cpu()
    return out.numpy()


def _use_fast_q8_0(quants) -> None:
    """Routes gguf-py's Q8_0 quantization of whole arrays (its rows in groups of 16, one numpy call each)
    through q8_0_blocks; every other type keeps gguf-py's own code."""
    grouped = quants._apply_over_grouped_rows

    def apply_over_grouped_rows(func, arr, otype, oshape):
        if getattr(func, "__self__", None) is quants.Q8_0 and func.__name__ == "quantize_rows":
            return q8_0_blocks(arr).reshape(oshape)
        return grouped(func, arr=arr, otype=otype, oshape=oshape)

    quants._apply_over_grouped_rows = apply_over_grouped_rows


def _convert_main(a: argparse.Namespace) -> int:
    """Runs the installation's converter in this process, patched for random weights or a forced
    pre-tokenizer; its classes live in conversion/ (newer trees) or in the script itself (older)."""
    converter = Path(a.converter)
    sys.path[:0] = [str(converter.parent), str(converter.parent / "gguf-py")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import convert_hf_to_gguf
    import gguf.quants

    _use_fast_q8_0(gguf.quants)
    classes = sys.modules.get("conversion.base", convert_hf_to_gguf)
    if a.random_seed is not None:
        weights = _random_weights(Path(a.model), a.random_seed, classes.LazyTorchTensor)

        def index_tensors(self, remote_hf_model_id=None):
            kept = (self.filter_tensors(item) for item in weights.items())
            return dict(item for item in kept if item)

        classes.ModelBase.index_tensors = index_tensors
    if a.pre_tokenizer:
        known = classes.TextModel.get_vocab_base_pre

        def get_vocab_base_pre(self, tokenizer):
            try:
                return known(self, tokenizer)
            except NotImplementedError:  # the hash of a tokenizer it has not seen
                return a.pre_tokenizer

        classes.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(converter), a.model, "--outtype", a.outtype, "--outfile", a.outfile]
    convert_hf_to_gguf.main()
    return 0


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tiermoe.bench.llamacpp", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="(internal) run the converter on a staged folder")
    c.add_argument("--converter", required=True)
    c.add_argument("--model", required=True)
    c.add_argument("--outfile", required=True)
    c.add_argument("--outtype", required=True)
    c.add_argument("--random-seed", type=int, default=None, help="random weights from config.json")
    c.add_argument("--pre-tokenizer", default=None, help="when the converter does not know the tokenizer")
    q = sub.add_parser("prepare", help="convert (and quantize) a checkpoint to the GGUF bench would use")
    q.add_argument("--llama-cpp", required=True)
    q.add_argument("--model", required=True)
    q.add_argument("--llama-cpp-formats", default=None, help=f"comma-separated, of {', '.join(FORMATS)}")
    q.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR))
    q.add_argument("--timeout", type=float, default=3600.0, help="seconds for converting, and for quantizing")
    a = p.parse_args(argv)
    if a.command == "convert":
        return _convert_main(a)
    install = locate(a.llama_cpp)
    options = LlamaCppOptions(
        install, Path(a.work_dir), parse_formats(a.llama_cpp_formats), convert_timeout_s=a.timeout
    )
    for fmt in options.formats:
        gguf = prepare_gguf(a.model, options, fmt=fmt)
        layout = read_layout(gguf.path)
        print(
            f"{gguf.path}: {gguf.dtype}, {gguf.weights} weights, {layout.n_layer} layers, "
            f"{layout.gpu_gib_all:.2f} GiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(_main())
