#!/usr/bin/env bash
# The quality of quantized experts and of fewer experts per token, on the trained demo model (the README's
# "Quantized experts" table): each format written by tiermoe convert, then tiermoe eval over both held-out
# texts at the full context (1024 tokens, stride 1023), beside bf16's figures (docs/demo-model/eval-*-1024.json).
# CPU, about 10 minutes on 2 cores; results in docs/demo-model/quantized/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
T="python3 -m tiermoe.cli"
M=src/tiermoe/data/demo-moe
D=docs/demo-model
OUT=$D/quantized
mkdir -p "$OUT"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$T convert --model "$M" --experts fp8 --out "$tmp/fp8"
$T convert --model "$M" --experts int4 --scales rtn --out "$tmp/int4-rtn"
$T convert --model "$M" --experts int4 --scales mse --out "$tmp/int4-mse"
$T convert --model "$M" --experts nvfp4 --out "$tmp/nvfp4"
for text in plays python; do
    flags=(--device cpu --dtype fp32 --context 1024 --stride 1023 --text "$D/heldout_$text.txt")
    for q in fp8 int4-rtn int4-mse nvfp4; do
        $T eval --model "$tmp/$q" "${flags[@]}" --json "$OUT/eval-$q-$text.json"
    done
    for k in 3 2; do
        $T eval --model "$M" --experts-per-token "$k" "${flags[@]}" --json "$OUT/eval-k$k-$text.json"
    done
done
