#!/usr/bin/env bash
# Decode speed of an older tiermoe source tree against this checkout's, on the same machine, interleaved
# (old, new, old, new, ...) so that drift of the machine shows as spread rather than as a difference:
#
#   OLD_SRC=DIR OLD_REV=HASH [VARIANTS=lfu+noprefetch+staged] bash scripts/ab_decode.sh MODEL_DIR BUDGET_GIB [ROUNDS] [REPEAT]
#
# OLD_SRC: the older tree's src/ (e.g. `git archive 434c314 src | tar -x -C .carry/ab`, carried). Each
# round runs `tiermoe bench --routing szd` once per tree (REPEAT timed runs after a warm-up, default 3);
# every run's samples go to one file, bench/results/ab-<model>-<budget>g-<date>.json, beside the two
# trees' revisions, the command and the machine.
set -euo pipefail
model=${1:?usage: OLD_SRC=DIR OLD_REV=HASH $0 MODEL_DIR BUDGET_GIB [ROUNDS] [REPEAT]}
budget=${2:?budget in GiB}
rounds=${3:-2}
repeat=${4:-3}
: "${OLD_SRC:?the older tree\'s src/}" "${OLD_REV:?its revision}"
cd "$(dirname "$0")/.."
new_rev=${TIERMOE_GIT_REV:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
old_src=$(cd "$OLD_SRC" && pwd)
tmp=$(mktemp -d)
for round in $(seq "$rounds"); do
    for side in old new; do
        src=$PWD/src rev=$new_rev
        [[ $side == old ]] && src=$old_src rev=$OLD_REV
        TIERMOE_GIT_REV=$rev PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}" python3 -m tiermoe.cli bench \
            --model "$model" --gpu-budget "$budget" --routing szd --prompt-len 128 --gen-len 64 --batch 1 \
            --repeat "$repeat" ${VARIANTS:+--variants "$VARIANTS"} --out-dir "$tmp/$round-$side" > "$tmp/$round-$side.log" 2>&1 ||
            { echo "ab_decode: $side (round $round) failed:"; tail -n 5 "$tmp/$round-$side.log"; exit 1; }
        ls "$tmp/$round-$side"/bench-*.json > /dev/null
    done
done
python3 - "$tmp" "$model" "$budget" "$OLD_REV" "$new_rev" "$*" <<'PY'
import datetime, glob, json, statistics, sys
from pathlib import Path
tmp, model, budget, old_rev, new_rev, args = sys.argv[1:]
runs = []
for path in sorted(glob.glob(f"{tmp}/*-*/bench-*.json")):
    round_, side = Path(path).parent.name.split("-")
    for r in json.load(open(path))["runs"]:
        if r["error"]:
            sys.exit(f"ab_decode: {side} (round {round_}): {r['error']}")
        r.update(ab_side=side, ab_round=int(round_), git_rev=old_rev if side == "old" else new_rev)
        runs.append(r)
samples = {s: [x["decode_tok_s"] for r in runs if r["ab_side"] == s for x in r["samples"]] for s in ("old", "new")}
summary = {s: {"median_tok_s": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)} for s, v in samples.items()}
now = datetime.datetime.now(datetime.timezone.utc)
out = Path("bench/results") / f"ab-{Path(model).name}-{budget}g-{now:%Y%m%dT%H%M%SZ}.json"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps({
    "command": f"scripts/ab_decode.sh {args}", "old_rev": old_rev, "new_rev": new_rev, "date": now.isoformat(),
    "device": runs[0].get("device"), "summary": summary, "runs": runs,
}, indent=1))
print(f"ab_decode: {Path(model).name} at {budget} GiB, szd: old {old_rev} {summary['old']}; new {new_rev} {summary['new']}")
print(f"saved {out}")
PY
