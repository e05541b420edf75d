#!/usr/bin/env bash
# The GPU benchmark suite, in one call of under 10 minutes on an H100 (see bench/README.md).
#
#   scripts/bench_suite.sh            profile + OLMoE-1B-7B: tiermoe at a 4 GiB cap and uncapped, each
#                                     under natural, uniform and SZD routing; HF + accelerate offload
#                                     under the same cap
#   scripts/bench_suite.sh qwen3      Qwen3-30B-A3B shape at 8 GiB and uncapped, the same way
#   scripts/bench_suite.sh qwen3-int4 the same shapes and caps with int4 experts, llama.cpp at Q4_K_M
#   scripts/bench_suite.sh olmoe-int4 (and -fp8, -nvfp4, -mxfp4 for those formats)
#   scripts/bench_suite.sh olmoe-disk OLMoE bf16 at 4 GiB GPU and 4 GiB host (12 GiB of experts on disk),
#                                     with the profile's O_DIRECT ceiling beside it
#   scripts/bench_suite.sh olmoe-plan tiermoe plan --verify at OLMoE 4 GiB, szd: every candidate layout
#                                     predicted and measured (issue 14's planner figure)
#   scripts/bench_suite.sh deepseek-v2-lite  DeepSeek-V2-Lite bf16 at 6 GiB (issue 16); deepseek-v3-7l: V3's first
#                                     7 layers, FP8 experts, at 24 GiB (per-layer costs of the real V3)
#   scripts/bench_suite.sh gpt-oss-20b gpt-oss-20b with MXFP4 experts at 8 GiB (issue 16)
#   scripts/bench_suite.sh qwen3-load the server at 8 GiB (olmoe-load: OLMoE at 4 GiB) under 64 streaming
#                                     clients for LOAD_S seconds (default 120; issue 15's load test)
#
# Results land in bench/results/ (and are copied to $OUT when the device tool sets it).
# Environment: SYNTH_DIR (where checkpoints are written, default ~/.cache/tiermoe/synth),
# TIERMOE (the command, default "python3 -m tiermoe.cli" from this checkout), PEERS (HF peers,
# default hf-offload; e.g. hf,hf-offload; none: no peer at all), LLAMA_CPP (a llama.cpp installation: adds the llama.cpp
# peer, which converts the checkpoint to GGUF first and does not fit the 10 minutes the first time;
# TIERMOE_LLAMA_CPP, the tests' name, works too), LLAMA_FORMATS (its GGUFs: default base for OLMoE, the
# converter's bf16, and base,q4_k_m for Qwen3, q8_0 and Q4_K_M), GPU_BUDGETS (tiermoe's caps, default the
# suite's cap and none; e.g. 8 alone where a lease is short), VARIANTS (tiermoe's store settings when
# capped, bench --variants; e.g. lfu+noprefetch+copy,lfu+noprefetch+staged to compare the miss paths; no path flag: auto).
# BATCHES: concurrent sequences, bench --batch (default 1; e.g. 1,4,16,64 for issue 15's concurrency figures).
# BENCH_ARGS: more flags for the suite's tiermoe bench runs, not its profile, plan or load runs
# (e.g. --kv-reserve-tokens 4096).
# PROMPT_LEN / GEN_LEN: each sequence's tokens in and out (defaults: the suite's; 64 sequences of 128 + 128
# need 2 GiB of OLMoE's KV cache, more than a 4 GiB cap leaves, so a sweep to 64 takes 64 + 64).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
TIERMOE=${TIERMOE:-python3 -m tiermoe.cli}
SYNTH_DIR=${SYNTH_DIR:-$HOME/.cache/tiermoe/synth}
RESULTS=bench/results
mkdir -p "$RESULTS" "$SYNTH_DIR"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# Write a preset once; a complete checkpoint (synth writes tiermoe_synth.json last) is reused.
# Prints the checkpoint directory; synth's own output goes to stderr.
synth() {
    local preset=$1 dir="$SYNTH_DIR/$1"
    if [[ ! -f "$dir/tiermoe_synth.json" ]]; then
        $TIERMOE synth --preset "$preset" --out "$dir" --dtype bf16 "${@:2}" >&2
    fi
    echo "$dir"
}

collect() {
    if [[ -n "${OUT:-}" ]]; then
        # The device tool brings back at most 8 files: the newest results of this run.
        ls -t "$RESULTS"/*.json "$RESULTS"/*.png 2>/dev/null | head -n 7 | xargs -r cp -t "$OUT"
    fi
}
trap collect EXIT

# Every tiermoe setting runs once per routing: natural (the random routers' own, an optimistic upper
# bound), uniform (no locality, the worst case) and szd (calibrated to trained models, ROUTING.md).
ROUTING=${ROUTINGS:-natural,uniform,szd}  # ROUTINGS=szd,uniform leaves out the upper bound where a lease is short
LLAMA_CPP=${LLAMA_CPP:-${TIERMOE_LLAMA_CPP:-}}  # the tests' name for the same folder
variant_flags=(${VARIANTS:+--variants "$VARIANTS"})
peer_flags=(--peers "${PEERS:-hf-offload}${LLAMA_CPP:+,llama.cpp}" ${LLAMA_CPP:+--llama-cpp "$LLAMA_CPP"})
# PEERS=none: tiermoe alone, llama.cpp included (a concurrency sweep, where the peers ran at batch 1 before)
if [[ ${PEERS:-} == none ]]; then LLAMA_CPP= peer_flags=(); fi
llama_formats() { [[ -n $LLAMA_CPP ]] && echo --llama-cpp-formats "${LLAMA_FORMATS:-$1}"; }

case "${1:-olmoe}" in
olmoe)
    # 1. Ceilings of this machine, and the decode floor of OLMoE at a 4 GiB cap: under uniform routing, and
    #    at 0.43, the LRU hit rate of trained OLMoE with as many slots per layer as top-k (ROUTING.md).
    model=$(synth olmoe-1b-7b)
    $TIERMOE profile --model "$model" --gpu-budget 4 --hit-rate 0.43 \
        --out "$RESULTS/profile-$(date -u +%Y%m%dT%H%M%SZ).json"
    # 2. Batch 1, 128-token prompt, 128 new tokens, median of 3: tiermoe at 4 GiB and uncapped, 3 routings
    #    each (~35-50 s a run); HF offload at the same cap (~0.6 tok/s: 8 tokens, timed once).
    $TIERMOE bench --model "$model" ${BENCH_ARGS:-} --gpu-budget "${GPU_BUDGETS:-4,none}" --routing "$ROUTING" "${variant_flags[@]}" \
        --prompt-len "${PROMPT_LEN:-128}" --gen-len "${GEN_LEN:-128}" --batch "${BATCHES:-1}" --repeat 3 \
        "${peer_flags[@]}" $(llama_formats base) --peer-gen-len 8 --peer-repeat 1 --timeout 240
    ;;
deepseek-v2-lite)
    # DeepSeek-V2-Lite (15.7B params, 29 GB of bf16 experts) at 6 GiB, issue 16's figure: MLA's latent cache,
    # 64 experts of 1408 a layer, top-6 and two shared experts; ROUTING.md's uncalibrated szd until a trace.
    # Its dense weights (2.44 GiB) and top-6 x 26 layers of 17.3 MB experts leave no room for the default
    # 1 GiB workspace at 6 GiB: half of it leaves 7 slots a layer of 64.
    model=$(synth deepseek-v2-lite)
    $TIERMOE bench --model "$model" ${BENCH_ARGS:-} --gpu-budget "${GPU_BUDGETS:-6}" --workspace 0.5 --routing "$ROUTING" "${variant_flags[@]}" \
        --prompt-len "${PROMPT_LEN:-128}" --gen-len "${GEN_LEN:-64}" --batch "${BATCHES:-1}" --repeat 2 \
        "${peer_flags[@]}" $(llama_formats base) --peer-gen-len 3 --peer-repeat 1 --timeout 300
    ;;
gpt-oss-20b)
    # gpt-oss-20b as published: MXFP4 experts (768 of 12.7 MB, 9.8 GB, generated into the host cache), bf16
    # dense weights (3.6 GB, a third of it the untied 201k-token embeddings), at 8 GiB (issue 16's figure).
    model="$SYNTH_DIR/gpt-oss-20b-mxfp4"
    [[ -f "$model/tiermoe_synth.json" ]] || $TIERMOE synth --preset gpt-oss-20b --out "$model" --dtype bf16 \
        --experts-in-memory --experts mxfp4 >&2
    $TIERMOE bench --model "$model" ${BENCH_ARGS:-} --gpu-budget "${GPU_BUDGETS:-8}" --routing "$ROUTING" "${variant_flags[@]}" \
        --prompt-len "${PROMPT_LEN:-128}" --gen-len "${GEN_LEN:-64}" --batch "${BATCHES:-1}" --repeat 2 \
        "${peer_flags[@]}" --peer-gen-len 3 --peer-repeat 1 --timeout 300
    ;;
deepseek-v3-7l)
    # DeepSeek-V3's first 7 layers (3 dense, 4 MoE of 256 FP8 experts: 45 GB in host memory) at 24 GiB:
    # decode time per MoE layer, from which the full 58-MoE-layer model's tok/s follows (NOTES shows how).
    # The peers build it with random weights: HF offload in bf16 (about 95 GB, 71 of them in host memory),
    # llama.cpp as a q8_0 GGUF (about 48 GB; the session puts its work dir in /dev/shm: the disk is too small).
    model="$SYNTH_DIR/deepseek-v3-7l-fp8"
    [[ -f "$model/tiermoe_synth.json" ]] || $TIERMOE synth --preset deepseek-v3-7l --out "$model" --dtype bf16 \
        --experts-in-memory --experts fp8 >&2
    $TIERMOE bench --model "$model" ${BENCH_ARGS:-} --gpu-budget "${GPU_BUDGETS:-24}" --routing "$ROUTING" "${variant_flags[@]}" \
        --prompt-len "${PROMPT_LEN:-128}" --gen-len "${GEN_LEN:-32}" --batch "${BATCHES:-1}" --repeat 2 \
        "${peer_flags[@]}" $(llama_formats base) --peer-gen-len 3 --peer-repeat 1 --timeout 900
    ;;
qwen3)
    # Qwen3-30B-A3B (30.5B params): its 57 GiB of bf16 experts do not fit the 64 GiB disk beside the OS, so
    # synth writes only the dense weights and tiermoe generates the experts (seeded, normal(0, 0.02)) straight
    # into its pinned host cache; the peers build the same architecture with random weights in memory.
    # A capped run loads for 40-75 s, so 64 new tokens timed twice keep the six tiermoe runs near 5 minutes;
    # HF offload (0.1 tok/s, ~3 minutes for 3 tokens) takes the rest.
    model=$(synth qwen3-30b-a3b --experts-in-memory)
    $TIERMOE bench --model "$model" ${BENCH_ARGS:-} --gpu-budget "${GPU_BUDGETS:-8,none}" --routing "$ROUTING" "${variant_flags[@]}" \
        --prompt-len "${PROMPT_LEN:-128}" --gen-len "${GEN_LEN:-64}" --batch "${BATCHES:-1}" --repeat 2 \
        "${peer_flags[@]}" $(llama_formats base,q4_k_m) --peer-gen-len 3 --peer-repeat 1 --timeout 300
    ;;
qwen3-int4 | olmoe-int4 | qwen3-fp8 | olmoe-fp8 | qwen3-nvfp4 | olmoe-nvfp4 | qwen3-mxfp4 | olmoe-mxfp4)
    # Quantized experts (issue 12): tiermoe with quantized experts (the format's Triton decode kernel) and
    # with the bf16 ones (--also-model) under the same cap, and llama.cpp's Q4_K_M made from the bf16
    # checkpoint of the same shape, in one results file. Qwen3's quantized experts are generated in
    # memory like its bf16 ones; OLMoE's are converted from its bf16 synth (int4 with round-to-nearest
    # scales: the search changes quality, not speed). ALSO_BF16=0 leaves the bf16 runs out.
    fmt=${1#*-}
    if [[ $1 == qwen3-* ]]; then
        bf16=$(synth qwen3-30b-a3b --experts-in-memory) budget=8 gen=64 repeat=2
        model="$SYNTH_DIR/qwen3-30b-a3b-$fmt"
        [[ -f "$model/tiermoe_synth.json" ]] || $TIERMOE synth --preset qwen3-30b-a3b --out "$model" --dtype bf16 \
            --experts-in-memory --experts "$fmt" >&2
    else
        bf16=$(synth olmoe-1b-7b) budget=4 gen=128 repeat=3
        model="$SYNTH_DIR/olmoe-1b-7b-$fmt"
        scales=()
        [[ $fmt == int4 ]] && scales=(--scales rtn)
        [[ -f "$model/config.json" ]] || $TIERMOE convert --model "$bf16" --experts "$fmt" "${scales[@]}" --out "$model"
    fi
    $TIERMOE bench --model "$model" ${BENCH_ARGS:-} --gpu-budget "${GPU_BUDGETS:-$budget}" --routing "$ROUTING" "${variant_flags[@]}" \
        --prompt-len "${PROMPT_LEN:-128}" --gen-len "${GEN_LEN:-$gen}" --batch "${BATCHES:-1}" --repeat "$repeat" \
        $([[ ${ALSO_BF16:-1} != 0 ]] && echo --also-model "$bf16") \
        ${LLAMA_CPP:+--peers llama.cpp --llama-cpp "$LLAMA_CPP" --llama-cpp-source "$bf16"} \
        $(llama_formats q4_k_m) --timeout 300
    ;;
olmoe-disk)
    # The disk tier (issue 14): the host cache holds a third of the experts, the rest is read with
    # O_DIRECT by the reader threads; the profile beside it measures the drive's ceiling.
    model=$(synth olmoe-1b-7b)
    $TIERMOE profile --model "$model" --gpu-budget 4 --disk-dir "$model" \
        --out "$RESULTS/profile-$(date -u +%Y%m%dT%H%M%SZ).json"
    $TIERMOE bench --model "$model" ${BENCH_ARGS:-} --gpu-budget 4 --cpu-budget 4 --routing "${ROUTINGS:-szd}" "${variant_flags[@]}" \
        --prompt-len "${PROMPT_LEN:-128}" --gen-len "${GEN_LEN:-64}" --batch "${BATCHES:-1}" --repeat 2 --timeout 400
    ;;
olmoe-plan)
    model=$(synth olmoe-1b-7b)
    $TIERMOE plan --model "$model" --gpu-budget 4 --routing szd --verify
    ;;
qwen3-load | olmoe-load)
    # Issue 15's load test: the real server at the suite's cap, 64 streaming clients for 2 minutes.
    if [[ $1 == qwen3-* ]]; then model=$(synth qwen3-30b-a3b --experts-in-memory) budget=8; else model=$(synth olmoe-1b-7b) budget=4; fi
    $TIERMOE serve --model "$model" --gpu-budget "$budget" --max-num-seqs 64 --port 8123 > "$RESULTS/serve.log" 2>&1 &
    server=$!
    trap 'kill $server 2>/dev/null; collect' EXIT
    until python3 -c 'import urllib.request as u; u.urlopen("http://127.0.0.1:8123/health", timeout=5)' 2> /dev/null; do
        kill -0 $server 2>/dev/null || { tail -n 20 "$RESULTS/serve.log"; exit 1; }
        sleep 2
    done
    python3 -m tiermoe.bench.load --url http://127.0.0.1:8123 --model "$(basename "$model")" --clients 64 \
        --duration-s "${LOAD_S:-120}" --max-tokens 64 --out-dir "$RESULTS"
    ;;
*)
    echo "usage: $0 [olmoe|qwen3|{qwen3,olmoe}-{int4,fp8,nvfp4,mxfp4}|olmoe-disk|olmoe-plan|{qwen3,olmoe}-load]" >&2
    exit 2
    ;;
esac
