#!/usr/bin/env bash
# Assemble the folder `tiermoe bench --peers llama.cpp --llama-cpp DIR` takes (bench/README.md, "The llama.cpp
# peer") from a copy of the prebuilt llama.cpp kit (the project's shared/llamacpp folder):
#
#   bash scripts/llamacpp_dir.sh KIT OUTDIR
#
#   KIT/llamacpp-bin.tar.xz.part-*  ->  OUTDIR/bin/llama-bench, llama-quantize, ... (CUDA build, sm_90)
#   KIT/convert/                    ->  OUTDIR/convert/convert_hf_to_gguf.py, conversion/, gguf-py/
#   KIT/tokenizers.tar.gz           ->  OUTDIR/tokenizers/qwen2/, olmo/
#
# Then checks the layout with tiermoe's own validation (tiermoe.bench.llamacpp.locate). Safe to run again: an
# OUTDIR that already validates is left as it is.
set -euo pipefail
kit=${1:?usage: $0 KIT OUTDIR}
out=${2:?usage: $0 KIT OUTDIR}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
validate() { python3 -c 'import sys; from tiermoe.bench.llamacpp import locate; print(locate(sys.argv[1]))' "$1"; }

if [[ -x "$out/bin/llama-bench" ]] && validate "$out" >/dev/null 2>&1; then
    echo "llamacpp_dir: $out is already a llama.cpp dir"
    exit 0
fi
parts=("$kit"/llamacpp-bin.tar.xz.part-*)
[[ -f "${parts[0]}" ]] || { echo "llamacpp_dir: no $kit/llamacpp-bin.tar.xz.part-* files" >&2; exit 1; }
mkdir -p "$out/tokenizers"
cat "${parts[@]}" | tar -C "$out" -xJf -          # the tarball holds bin/
rm -rf "$out/convert" && cp -r "$kit/convert" "$out/convert"
chmod -R u+w "$out/convert"                         # the kit may be read-only; later runs replace this copy
tar -C "$out/tokenizers" -xzf "$kit/tokenizers.tar.gz"
validate "$out"
echo "llamacpp_dir: $out is ready; its binaries run only where CUDA 13 and glibc 2.38 are (the GPU machine)"
