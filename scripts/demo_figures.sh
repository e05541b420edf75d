#!/usr/bin/env bash
# The demo model's held-out figures in docs/demo-model.md, on CPU (~6 minutes on 2 cores):
#   - perplexity of each held-out text by tiermoe eval, at the training window (256 tokens, stride 128)
#     and at the full context (1024, stride 1023);
#   - the model's routing on that text, recorded during the second pass (docs/demo-model/routing-*.npz),
#     and its routing report with every token a decode step (the windows are teacher-forced prefills);
#   - the same report for SZD and uniform routing forced onto the model over the plays, for comparison;
#   - the README's "Quantized experts" table (~10 more minutes): each format written by tiermoe convert, and
#     fewer experts per token, evaluated at the full context (docs/demo-model/quantized/).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
T="python3 -m tiermoe.cli"
M=src/tiermoe/data/demo-moe
D=docs/demo-model
eval_flags=(--model "$M" --device cpu --dtype fp32)
for text in plays python; do
    $T eval "${eval_flags[@]}" --text "$D/heldout_$text.txt" --context 256 --stride 128 --json "$D/eval-$text-256.json"
    $T eval "${eval_flags[@]}" --text "$D/heldout_$text.txt" --context 1024 --stride 1023 \
        --json "$D/eval-$text-1024.json" --record-routing "$D/routing-$text.npz"
    $T routing-report "$D/routing-$text.npz" --as-decode --json "$D/routing-$text.json" --png "$D/routing-$text.png"
done
tmp=$(mktemp -d)
for routing in szd uniform; do
    $T eval "${eval_flags[@]}" --text "$D/heldout_plays.txt" --context 1024 --stride 1023 --routing "$routing" \
        --record-routing "$tmp/$routing.npz"
    $T routing-report "$tmp/$routing.npz" --as-decode --json "$D/routing-plays-$routing.json"
done
rm -rf "$tmp"

Q=$D/quantized
mkdir -p "$Q"
trap 'rm -rf "$tmp"' EXIT
tmp=$(mktemp -d)
$T convert --model "$M" --experts fp8 --out "$tmp/fp8"
$T convert --model "$M" --experts int4 --scales rtn --out "$tmp/int4-rtn"
$T convert --model "$M" --experts int4 --scales mse --out "$tmp/int4-mse"
$T convert --model "$M" --experts nvfp4 --out "$tmp/nvfp4"
$T convert --model "$M" --experts mxfp4 --out "$tmp/mxfp4"
for text in plays python; do
    flags=(--device cpu --dtype fp32 --context 1024 --stride 1023 --text "$D/heldout_$text.txt")
    for q in fp8 int4-rtn int4-mse nvfp4 mxfp4; do
        $T eval --model "$tmp/$q" "${flags[@]}" --json "$Q/eval-$q-$text.json"
    done
    for k in 3 2; do
        $T eval --model "$M" --experts-per-token "$k" "${flags[@]}" --json "$Q/eval-k$k-$text.json"
    done
done
