"""The llama.cpp peer on the CPU: locating an installation, the --n-cpu-moe planner on a GGUF written here,
llama-bench's JSON, the command of each setting, and the run dicts (with a stand-in llama-bench). The real
converter and binaries run only where TIERMOE_LLAMA_CPP names a llama.cpp dir (scripts/llamacpp_dir.sh)."""

import json
import os
import stat
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from tiermoe.bench import llamacpp, report, run
from tiermoe.bench.workload import Workload
from tiermoe.errors import InvalidRequestError

MIB, GIB = 1 << 20, 1 << 30
LLAMA_CPP = os.environ.get("TIERMOE_LLAMA_CPP")
needs_llama_cpp = pytest.mark.skipif(not LLAMA_CPP, reason="set TIERMOE_LLAMA_CPP to a llama.cpp dir")


# ---------------------------------------------------------------------------------------- a GGUF by hand

F32, BF16, Q8_0 = 0, 30, 8
BYTES = {F32: lambda n: 4 * n, BF16: lambda n: 2 * n, Q8_0: lambda n: n // 32 * 34}  # Q8_0: 34 B per 32


def _string(s: str) -> bytes:
    return struct.pack("<Q", len(s.encode())) + s.encode()


def _kv(key: str, value) -> bytes:
    """GGUF key-value: string (8), uint32 (4), float32 (6), or an array (9) of strings or int32s (5)."""
    if isinstance(value, str):
        body = struct.pack("<I", 8) + _string(value)
    elif isinstance(value, float):
        body = struct.pack("<If", 6, value)
    elif isinstance(value, int):
        body = struct.pack("<II", 4, value)
    elif isinstance(value[0], str):
        body = struct.pack("<IIQ", 9, 8, len(value)) + b"".join(_string(v) for v in value)
    else:
        body = struct.pack("<IIQ", 9, 5, len(value)) + struct.pack(f"<{len(value)}i", *value)
    return _string(key) + body


def write_gguf(path: Path, fields: dict, tensors: list[tuple[str, tuple[int, ...], int]]) -> Path:
    """A GGUF v3 file: header, key-values, tensor infos (dims innermost first), zeroed data aligned to 32."""
    sizes = []
    for _, dims, kind in tensors:
        n = 1
        for d in dims:
            n *= d
        sizes.append(BYTES[kind](n))
    infos, offset = b"", 0
    for (name, dims, kind), size in zip(tensors, sizes, strict=True):
        infos += _string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        infos += struct.pack("<IQ", kind, offset)
        offset += -(-size // 32) * 32
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(fields))
    head += b"".join(_kv(k, v) for k, v in fields.items()) + infos
    path.write_bytes(head + bytes(-len(head) % 32) + bytes(offset))
    return path


# A 4-layer Qwen3-MoE shape whose layer 0 is dense (no experts) and whose layer 3 keeps its experts in
# bf16, so that which layers --n-cpu-moe moves, and each type's size, change the answer.
VOCAB, HIDDEN, INTER, EXPERTS = 1000, 64, 32, 8
EXPERT_BYTES = (0, 3 * HIDDEN * INTER * EXPERTS // 32 * 34, 3 * HIDDEN * INTER * EXPERTS // 32 * 34, 3 * HIDDEN * INTER * EXPERTS * 2)  # fmt: skip
TOKEN_EMBD_BYTES = VOCAB * HIDDEN * 2


def _tensors() -> list[tuple[str, tuple[int, ...], int]]:
    t = [("token_embd.weight", (HIDDEN, VOCAB), BF16), ("output.weight", (HIDDEN, VOCAB), Q8_0)]
    t.append(("output_norm.weight", (HIDDEN,), F32))
    for i in range(4):
        t += [
            (f"blk.{i}.attn_q.weight", (HIDDEN, HIDDEN), BF16),
            (f"blk.{i}.attn_norm.weight", (HIDDEN,), F32),
        ]
        if i == 0:
            t += [(f"blk.0.ffn_{p}.weight", (HIDDEN, 128), BF16) for p in ("gate", "up", "down")]
            continue
        kind = BF16 if i == 3 else Q8_0
        t += [
            (f"blk.{i}.ffn_gate_exps.weight", (HIDDEN, INTER, EXPERTS), kind),
            (f"blk.{i}.ffn_up_exps.weight", (HIDDEN, INTER, EXPERTS), kind),
            (f"blk.{i}.ffn_down_exps.weight", (INTER, HIDDEN, EXPERTS), kind),
            (f"blk.{i}.ffn_gate_inp.weight", (HIDDEN, EXPERTS), F32),  # the router stays on the GPU
            (f"blk.{i}.ffn_up_shexp.weight", (HIDDEN, INTER), BF16),  # a shared expert is not moved
        ]
    return t


# Everything on the GPU but token_embd and the routed experts, summed from _tensors by hand.
DENSE_GPU_BYTES = (
    VOCAB * HIDDEN // 32 * 34 + 4 * HIDDEN + 4 * (HIDDEN * HIDDEN * 2 + 4 * HIDDEN) + 3 * HIDDEN * 128 * 2
    + 3 * (HIDDEN * EXPERTS * 4 + HIDDEN * INTER * 2)
)  # fmt: skip
KV_BYTES_PER_TOKEN = 4 * 2 * (16 + 16) * 2  # layers x KV heads x (key + value length) x f16


@pytest.fixture
def gguf(tmp_path) -> Path:
    fields = {
        "general.architecture": "qwen3moe",
        "general.name": "planner test",
        "qwen3moe.block_count": 4,
        "qwen3moe.embedding_length": HIDDEN,
        "qwen3moe.attention.head_count": 4,
        "qwen3moe.attention.head_count_kv": 2,
        "qwen3moe.attention.key_length": 16,
        "qwen3moe.attention.value_length": 16,
        "qwen3moe.rope.freq_base": 1e6,
        "tokenizer.ggml.tokens": [f"tok{i}" for i in range(VOCAB)],
        "tokenizer.ggml.token_type": [1] * VOCAB,
    }
    return write_gguf(tmp_path / "m.gguf", fields, _tensors())


def test_layout_reads_tensor_sizes_and_attention_shape(gguf):
    layout = llamacpp.read_layout(gguf)
    assert (layout.arch, layout.n_layer, layout.n_vocab) == ("qwen3moe", 4, VOCAB)
    assert layout.expert_bytes == EXPERT_BYTES
    assert layout.cpu_bytes == TOKEN_EMBD_BYTES
    assert layout.dense_gpu_bytes == DENSE_GPU_BYTES
    assert layout.kv_bytes_per_token == KV_BYTES_PER_TOKEN


def test_layout_agrees_with_gguf_py(gguf):
    """The reference reader (llama.cpp's gguf-py) sees the same file and the same tensor sizes."""
    root = Path(LLAMA_CPP or "/work/shared/llamacpp")
    gguf_py = next((p for p in (root / "convert" / "gguf-py", root / "gguf-py") if p.is_dir()), None)
    if gguf_py is None:
        pytest.skip("no gguf-py here (set TIERMOE_LLAMA_CPP)")
    sys.path.insert(0, str(gguf_py))
    try:
        from gguf import GGUFReader

        reader = GGUFReader(gguf)
    finally:
        sys.path.remove(str(gguf_py))
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    layout = llamacpp.read_layout(gguf)
    assert sizes["token_embd.weight"] == layout.cpu_bytes
    assert sum(sizes.values()) == layout.cpu_bytes + layout.dense_gpu_bytes + sum(layout.expert_bytes)
    assert sum(v for k, v in sizes.items() if k.startswith("blk.3.ffn_") and "_exps" in k) == EXPERT_BYTES[3]


def test_q8_0_is_bit_for_bit_gguf_pys(monkeypatch):
    """The fast Q8_0 the converter runs with gives gguf-py's bytes (the reference of ggml-quants.c) on
    random rows and on the edge cases: an all-zero block, exact halves, a value just below a half,
    denormal-sized scales."""
    root = Path(LLAMA_CPP or "/work/shared/llamacpp")
    gguf_py = next((p for p in (root / "convert" / "gguf-py", root / "gguf-py") if p.is_dir()), None)
    if gguf_py is None:
        pytest.skip("no gguf-py here (set TIERMOE_LLAMA_CPP)")
    monkeypatch.syspath_prepend(str(gguf_py))
    import gguf.quants as quants

    monkeypatch.setattr(llamacpp, "_Q8_0_CHUNK_BLOCKS", 100)  # several chunks, the last one short
    x = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32) * 0.02
    x[0, :32] = 0
    x[1, :32] = np.arange(32) - 15.5  # d = 16.5 / 127: many x / d land near halves
    x[2, :32] = np.float32(0.5) * np.where(np.arange(32) % 2, 1, -1) * 127  # d = 0.5, x / d = +-127
    x[3, :31] = np.nextafter(np.float32(0.5), np.float32(0))  # just below a half after scaling by 1
    x[3, 31] = 127
    x[4, :32] *= 1e-35
    reference = quants.quantize(x, quants.GGMLQuantizationType.Q8_0)
    bf16 = quants.quantize(x, quants.GGMLQuantizationType.BF16)
    fast = llamacpp.q8_0_blocks(x).reshape(reference.shape)
    assert fast.dtype == np.uint8 and fast.shape == (64, 256 // 32 * 34)
    assert np.array_equal(fast, reference)
    # the converter's route to it (setattr first, so that the original comes back after the test)
    monkeypatch.setattr(quants, "_apply_over_grouped_rows", quants._apply_over_grouped_rows)
    llamacpp._use_fast_q8_0(quants)
    assert np.array_equal(quants.quantize(x, quants.GGMLQuantizationType.Q8_0), reference)
    assert np.array_equal(quants.quantize(x, quants.GGMLQuantizationType.BF16), bf16)  # gguf-py's own


def _gpu(n_cpu_moe: int, tokens: int) -> int:
    """llama.cpp's GPU bytes by hand: a context of `tokens` padded to 256, a micro-batch of min(512,
    tokens) f32 logits plus 192 MiB of compute buffer, the dense tensors and layers >= N's experts."""
    n_ctx = -(-tokens // 256) * 256
    compute = min(512, tokens) * VOCAB * 4 + 192 * MIB
    return DENSE_GPU_BYTES + sum(EXPERT_BYTES[n_cpu_moe:]) + n_ctx * KV_BYTES_PER_TOKEN + compute


def test_gpu_bytes_per_n_cpu_moe(gguf):
    layout = llamacpp.read_layout(gguf)
    for n in range(5):
        assert llamacpp.gpu_bytes(layout, n, 300, 64) == _gpu(n, 300)  # pp's context is the larger
    assert llamacpp.gpu_bytes(layout, 0, 64, 600) == _gpu(0, 600)  # tg's context is the larger


def test_planner_moves_the_first_layers_experts_until_the_budget_fits(gguf):
    layout = llamacpp.read_layout(gguf)
    ctx_gib = 0.5

    def fit(gpu_bytes: int) -> int | None:
        return llamacpp.fit_n_cpu_moe(layout, gpu_bytes / GIB + ctx_gib, 128, 64, ctx_gib)

    assert fit(_gpu(0, 128)) == 0  # everything fits
    assert fit(_gpu(0, 128) - 1) == 2  # layer 0 has no experts: N=1 frees nothing
    assert fit(_gpu(2, 128)) == 2
    assert fit(_gpu(2, 128) - 1) == 3
    assert fit(_gpu(4, 128)) == 4
    assert fit(_gpu(4, 128) - 1) is None  # not even with every expert on the CPU


def test_settings_and_their_commands(gguf, tmp_path):
    layout = llamacpp.read_layout(gguf)
    w = Workload(128, 64, repeat=3)
    room_for_n2 = (_gpu(2, 128) + 1000) / GIB + 0.5
    settings = llamacpp.plan_settings(layout, [room_for_n2, None, 0.1], 80.0, w, 0.5)
    assert [(s.name, s.gpu_budget_gib, s.n_cpu_moe) for s in settings] == [
        ("all-gpu", None, 0),
        ("fit", room_for_n2, 2),
        ("fit", 0.1, None),
        ("experts-cpu", None, 4),
    ]
    assert settings[2].skip.startswith("even with every expert on the CPU it needs about 0.7 GiB")
    small_gpu = llamacpp.plan_settings(layout, [], 0.6, w, 0.5)[0]
    assert small_gpu.n_cpu_moe is None and small_gpu.skip.endswith("the GPU has 0.6 GiB")

    bench = tmp_path / "bin" / "llama-bench"
    assert llamacpp.bench_command(bench, gguf, w, 2) == [
        str(bench), "-m", str(gguf), "-p", "128", "-n", "64", "-r", "3", "-o", "json", "-ngl", "99",
        "-lm", "none", "--n-cpu-moe", "2",
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------- llama-bench JSON

# `llama-bench -m olmoe.gguf -p 128 -n 64 -r 3 -o json -ngl 99 -lm none --n-cpu-moe 0`, in the shape of
# tools/llama-bench/llama-bench.cpp's json_printer (every field of test::get_fields, then the samples).
BENCH_JSON = """[
  {
    "build_commit": "unknown",
    "build_number": 0,
    "cpu_info": "Intel(R) Xeon(R) Platinum 8480+",
    "gpu_info": "NVIDIA H100 80GB HBM3",
    "backends": "CUDA",
    "model_filename": "/root/.cache/tiermoe/gguf/olmoe-1b-7b-3f1c0d2e9a-bf16.gguf",
    "model_type": "olmoe A1.7B BF16",
    "model_size": 13838434304,
    "model_n_params": 6919161856,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 16,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": 99,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "none",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 128,
    "n_gen": 0,
    "n_depth": 0,
    "test_time": "2026-11-25T05:12:40Z",
    "avg_ns": 12102835,
    "stddev_ns": 10210,
    "avg_ts": 10576.039478,
    "stddev_ts": 8.926201,
    "samples_ns": [ 12091234, 12110457, 12106814 ],
    "samples_ts": [ 10586.2, 10569.4, 10572.6 ]
  },
  {
    "build_commit": "unknown",
    "build_number": 0,
    "cpu_info": "Intel(R) Xeon(R) Platinum 8480+",
    "gpu_info": "NVIDIA H100 80GB HBM3",
    "backends": "CUDA",
    "model_filename": "/root/.cache/tiermoe/gguf/olmoe-1b-7b-3f1c0d2e9a-bf16.gguf",
    "model_type": "olmoe A1.7B BF16",
    "model_size": 13838434304,
    "model_n_params": 6919161856,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 16,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": 99,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "none",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 0,
    "n_gen": 64,
    "n_depth": 0,
    "test_time": "2026-11-25T05:12:41Z",
    "avg_ns": 119404953,
    "stddev_ns": 87716,
    "avg_ts": 535.991359,
    "stddev_ts": 0.393794,
    "samples_ns": [ 119312644, 119487210, 119415005 ],
    "samples_ts": [ 536.406, 535.622, 535.946 ]
  }
]
"""


def test_bench_json_gives_prefill_and_decode_rates():
    figures = llamacpp.parse_bench_json(BENCH_JSON)
    assert figures["prefill_tok_s"] == pytest.approx(10576.039478)
    assert figures["decode_tok_s"] == pytest.approx(535.991359)
    assert figures["samples"][1] == {"prefill_tok_s": 10569.4, "decode_tok_s": 535.622}
    assert figures["build"] == "build 0, commit unknown"
    assert figures["llama_bench"]["n_threads"] == 16 and figures["llama_bench"]["load_mode"] == "none"
    with pytest.raises(llamacpp.LlamaCppError, match="no tg test"):
        llamacpp.parse_bench_json(json.dumps(json.loads(BENCH_JSON)[:1]))


# ---------------------------------------------------------------------------------------- installation


def _executable(path: Path, text: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _install(root: Path, bench_script: str | None = None) -> Path:
    """The layout scripts/llamacpp_dir.sh makes: bin/, convert/ (with conversion/ and gguf-py/), tokenizers/."""
    _executable(root / "bin" / "llama-bench", bench_script or "#!/bin/sh\nexit 0\n")
    _executable(root / "bin" / "llama-quantize")
    for d in ("convert/conversion", "convert/gguf-py", "tokenizers/qwen2"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "convert" / "convert_hf_to_gguf.py").write_text("from conversion import ModelBase\n")
    return root


def test_locate_names_everything_missing(tmp_path):
    with pytest.raises(InvalidRequestError) as e:
        llamacpp.locate(tmp_path)
    msg = str(e.value)
    assert "llama-bench" in msg and "llama-quantize" in msg and "convert_hf_to_gguf.py" in msg
    assert e.value.param == "llama_cpp"

    (tmp_path / "build" / "bin").mkdir(parents=True)
    (tmp_path / "build" / "bin" / "llama-bench").write_text("not executable")
    _executable(tmp_path / "build" / "bin" / "llama-quantize")
    (tmp_path / "convert_hf_to_gguf.py").write_text("from conversion import ModelBase\n")
    (tmp_path / "gguf-py").mkdir()
    with pytest.raises(InvalidRequestError) as e:
        llamacpp.locate(tmp_path)
    msg = str(e.value)
    assert "the executable llama-bench" in msg and "llama-quantize" not in msg.split("Layout:")[0]
    assert f"{tmp_path}/conversion/ beside the converter" in msg and "gguf-py/ beside" not in msg


def test_locate_takes_the_assembled_layout_and_a_source_tree(tmp_path):
    found = llamacpp.locate(_install(tmp_path / "kit"))
    assert found.llama_bench == tmp_path / "kit" / "bin" / "llama-bench"
    assert found.converter == tmp_path / "kit" / "convert" / "convert_hf_to_gguf.py"
    assert found.tokenizers == tmp_path / "kit" / "tokenizers"

    tree = tmp_path / "llama.cpp"  # a source checkout built in build/, an older one-file converter
    _executable(tree / "build" / "bin" / "llama-bench")
    _executable(tree / "build" / "bin" / "llama-quantize")
    (tree / "gguf-py").mkdir()
    (tree / "convert_hf_to_gguf.py").write_text("import gguf\n")
    found = llamacpp.locate(tree)
    assert found.llama_quantize == tree / "build" / "bin" / "llama-quantize" and found.tokenizers is None


# ---------------------------------------------------------------------------------------- bench integration


def test_bench_accepts_the_llama_cpp_peer_only_with_its_dir(tmp_path):
    assert run.parse_peers("hf,llama.cpp") == ["hf", "llama.cpp"]
    with pytest.raises(InvalidRequestError, match=r"peers are: hf, hf-offload, llama\.cpp"):
        run.parse_peers("llama")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3MoeForCausalLM"]}))
    with pytest.raises(InvalidRequestError, match="--llama-cpp DIR") as e:
        run.bench(tmp_path, Workload(8, 4), [None], ["llama.cpp"], progress=lambda _: None)
    assert e.value.param == "llama_cpp"
    assert llamacpp.options(None) is None


# Stands in for llama-bench: prints BENCH_JSON with the flags it was given, as the real one reports them.
FAKE_BENCH = """#!{python}
import json, sys
args = sys.argv[1:]
if args == ["--version"]:
    print("version: 0.5.0-dev (build 0, commit unknown)", file=sys.stderr)
    sys.exit(0)
flag = lambda f: args[args.index(f) + 1]
rows = json.loads(open({sample!r}).read())
for r in rows:
    r.update(model_filename=flag("-m"), n_cpu_moe=int(flag("--n-cpu-moe")), n_gpu_layers=int(flag("-ngl")))
    r["n_prompt" if r["n_prompt"] else "n_gen"] = int(flag("-p" if r["n_prompt"] else "-n"))
print(json.dumps(rows, indent=2))
"""


def test_runs_cover_every_setting_with_complete_run_dicts(gguf, tmp_path, monkeypatch):
    sample = tmp_path / "sample.json"
    sample.write_text(BENCH_JSON)
    root = _install(tmp_path / "kit", FAKE_BENCH.format(python=sys.executable, sample=str(sample)))
    options = llamacpp.LlamaCppOptions(llamacpp.locate(root), work_dir=tmp_path / "work")
    monkeypatch.setattr(llamacpp, "prepare_gguf", lambda *a, **k: llamacpp.Gguf(gguf, "q8_0", "random"))
    # An 80 GiB GPU whose used memory nvidia-smi cannot tell: peak_gpu_gib falls back to the plan.
    monkeypatch.setattr(llamacpp, "_nvidia_smi", lambda q: [81920.0] if q == "memory.total" else None)
    model = tmp_path / "model"
    model.mkdir()
    w = Workload(128, 64, repeat=3)
    budget = (_gpu(2, 128) + 1000) / GIB + 0.5
    runs = llamacpp.runs(model, w, [budget, None, 0.1], options, timeout_s=60, progress=lambda _: None)

    assert [(r["llama_cpp_setting"], r["gpu_budget_gib"], r["n_cpu_moe"]) for r in runs] == [
        ("all-gpu", None, 0), ("fit", budget, 2), ("fit", 0.1, None), ("experts-cpu", None, 4),
    ]  # fmt: skip
    brief_keys = {
        "engine", "model_preset", "experts_dtype", "gpu_budget_gib", "batch", "prompt_len", "gen_len", "repeat",
        "prefill_tok_s", "decode_tok_s", "ttft_s", "peak_gpu_gib", "peer_flags", "llama_cpp_version", "n_cpu_moe",
        "gguf", "error",
    }  # fmt: skip
    for r in runs:
        assert brief_keys <= set(r)
        assert (r["engine"], r["experts_dtype"], r["gguf_weights"], r["batch"]) == (
            "llama.cpp",
            "q8_0",
            "random",
            1,
        )
        assert (r["model_preset"], r["prompt_len"], r["gen_len"], r["repeat"], r["ttft_s"]) == (
            "model",
            128,
            64,
            3,
            None,
        )
    done = [r for r in runs if r["n_cpu_moe"] is not None]
    for r in done:
        assert r["error"] is None, r["error"]
        assert r["prefill_tok_s"] == pytest.approx(10576.039478) and r["decode_tok_s"] == pytest.approx(
            535.991359
        )
        assert r["llama_cpp_version"] == "0.5.0-dev (build 0, commit unknown)"
        assert r["peer_flags"].endswith(f"-ngl 99 -lm none --n-cpu-moe {r['n_cpu_moe']}")
        assert r["peer_flags"].startswith(f"-m {gguf} -p 128 -n 64 -r 3 -o json")
        assert r["plan_gpu_gib"] == pytest.approx(_gpu(r["n_cpu_moe"], 128) / GIB)
        assert r["peak_gpu_gib"] == pytest.approx(r["plan_gpu_gib"] + 0.5)
        assert len(r["samples"]) == 3
    assert runs[2]["error"].startswith("skipped: even with every expert on the CPU")
    assert runs[2]["decode_tok_s"] is None


def test_runs_repeat_every_setting_per_gguf_format(gguf, tmp_path, monkeypatch):
    sample = tmp_path / "sample.json"
    sample.write_text(BENCH_JSON)
    root = _install(tmp_path / "kit", FAKE_BENCH.format(python=sys.executable, sample=str(sample)))
    # llama.cpp converts the bf16 checkpoint that the benched (quantized) one was made from
    options = llamacpp.options(root, "base, q4_k_m,base", source=tmp_path / "bf16")
    assert options.formats == ("base", "q4_k_m")
    asked = []

    def prepare(model_dir, options, progress, fmt):
        asked.append((Path(model_dir).name, fmt))
        if fmt == "q4_k_m":
            raise llamacpp.LlamaCppError("llama-quantize failed")
        return llamacpp.Gguf(gguf, "q8_0", "random")

    monkeypatch.setattr(llamacpp, "prepare_gguf", prepare)
    monkeypatch.setattr(llamacpp, "_nvidia_smi", lambda q: [81920.0] if q == "memory.total" else None)
    runs = llamacpp.runs(
        tmp_path / "int4", Workload(128, 64), [None], options, timeout_s=60, progress=lambda _: None
    )
    assert asked == [("bf16", "base"), ("bf16", "q4_k_m")]
    assert [(r["llama_cpp_format"], r["experts_dtype"], r["llama_cpp_setting"], r["error"]) for r in runs] == [
        ("base", "q8_0", "all-gpu", None), ("base", "q8_0", "experts-cpu", None),
        ("q4_k_m", None, "all-gpu", "no GGUF: llama-quantize failed"),
        ("q4_k_m", None, "experts-cpu", "no GGUF: llama-quantize failed"),
    ]  # fmt: skip
    names = ["q8_0 all-gpu", "q8_0 experts-cpu", "q4_k_m all-gpu", "q4_k_m experts-cpu"]
    assert [report.variant_name(r) for r in runs] == names
    with pytest.raises(InvalidRequestError, match="base, q4_k_m, got 'q4_0'") as e:
        llamacpp.options(root, "q4_0")
    assert e.value.param == "llama_cpp_formats"


def test_runs_without_a_gpu_are_recorded_as_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp, "_nvidia_smi", lambda q: None)
    options = llamacpp.LlamaCppOptions(llamacpp.locate(_install(tmp_path / "kit")), work_dir=tmp_path / "w")
    runs = llamacpp.runs(tmp_path, Workload(8, 4), [4.0, None], options, progress=lambda _: None)
    assert [(r["llama_cpp_setting"], r["gpu_budget_gib"]) for r in runs] == [
        ("all-gpu", None), ("fit", 4.0), ("experts-cpu", None),
    ]  # fmt: skip
    assert all(r["error"].startswith("skipped: no NVIDIA GPU") for r in runs)
    assert not (tmp_path / "w").exists()  # nothing converted


# ---------------------------------------------------------------------------------------- with llama.cpp


@needs_llama_cpp
@pytest.mark.parametrize("in_memory", [False, True])
def test_conversion_with_the_installations_converter(tmp_path, in_memory):
    """The real converter (no GPU needed): bf16 from safetensors, or q8_0 with random weights for an
    --experts-in-memory checkpoint; cached, so a second call converts nothing."""
    from tiermoe.bench.synth import synth_checkpoint

    model = tmp_path / "tiny-qwen3-moe"
    synth_checkpoint("tiny-qwen3-moe", model, device="cpu", progress=False, experts_in_memory=in_memory)
    for f in model.glob("tokenizer*"):
        f.unlink()  # a checkpoint without a tokenizer gets one staged
    files = sorted((f.name, f.stat().st_mtime_ns) for f in model.iterdir())
    options = llamacpp.LlamaCppOptions(llamacpp.locate(LLAMA_CPP), work_dir=tmp_path / "work")
    said = []
    gguf = llamacpp.prepare_gguf(model, options, said.append)
    assert (gguf.dtype, gguf.weights) == (("q8_0", "random") if in_memory else ("bf16", "checkpoint"))
    layout = llamacpp.read_layout(gguf.path)
    per_layer = 3 * 64 * 32 * 8  # gate, up, down of 8 experts, hidden 64, intermediate 32
    assert layout.expert_bytes == (per_layer // 32 * 34 if in_memory else per_layer * 2,) * 2
    assert len(said) == 1
    assert sorted((f.name, f.stat().st_mtime_ns) for f in model.iterdir()) == files  # never written into
    assert llamacpp.prepare_gguf(model, options, said.append) == gguf and len(said) == 1


@pytest.mark.gpu
@needs_llama_cpp
def test_llama_bench_runs_every_setting_on_the_gpu(tmp_path):
    from tiermoe.bench.synth import synth_checkpoint

    model = tmp_path / "tiny-qwen3-moe"
    synth_checkpoint("tiny-qwen3-moe", model, progress=False)
    options = llamacpp.LlamaCppOptions(llamacpp.locate(LLAMA_CPP), work_dir=tmp_path / "work")
    runs = llamacpp.runs(model, Workload(32, 16, repeat=2), [2.0], options, timeout_s=120)
    assert [r["llama_cpp_setting"] for r in runs] == ["all-gpu", "fit", "experts-cpu"]
    for r in runs:
        assert r["error"] is None, r["error"]
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["llama_cpp_version"]
        assert 0 < r["peak_gpu_gib"] < 4


class _Sampler:
    """Stands in for `nvidia-smi -lms`: the samples it printed."""

    def __init__(self, samples: str):
        self.samples = samples

    def terminate(self):
        pass

    def communicate(self, timeout=None):
        return self.samples, ""


@pytest.mark.parametrize(
    ("samples", "peak"), [("1000\n1512\n1200\n", 512.0), ("1000\n1000\n", None), ("", None)]
)
def test_gpu_used_is_the_peak_above_the_base_or_nothing(monkeypatch, samples, peak):
    # A run shorter than the 250 ms sampling period (a tiny model) leaves only samples at the base:
    # that is no reading (the plan's figure stands in), not a peak of 0 GiB.
    monkeypatch.setattr(llamacpp, "_nvidia_smi", lambda query: [1000.0])
    monkeypatch.setattr(llamacpp.subprocess, "Popen", lambda *a, **k: _Sampler(samples))
    with llamacpp._gpu_used_mib() as used:
        pass
    assert used.get("peak_mib") == peak
