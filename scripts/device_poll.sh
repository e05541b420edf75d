#!/usr/bin/env bash
# Wait for scripts/device_session.sh (at most $1 seconds), then bring back its results and logs through $OUT.
W=${W:-/tmp/session}
end=$((SECONDS + ${1:-560}))
while [[ ! -e $W/done && $SECONDS -lt $end ]]; do sleep 5; done
cd "$W/repo" || exit 1
tar -czf "$OUT/session.tar.gz" -C "$W" --exclude repo --exclude demo-model . -C "$W/repo" bench/results 2>/dev/null
# The trained demo model (about 30 MB) once, in parts under the 16 MiB a file that comes back.
if grep -q "demo training done (0)" "$W/phases.log" 2>/dev/null && [[ ! -e $W/demo-sent ]]; then
    tar -cf - -C "$W" demo-model | split -b 15M - "$OUT/demo-model.tar.part-" && touch "$W/demo-sent"
fi
echo "--- train"; tail -n 3 "$W/train.log" 2>/dev/null
cat "$W/phases.log" 2>/dev/null | tail -n 30
echo ---; tail -n 5 "$W/pytest.log" 2>/dev/null
echo "--- drive"; tail -n 5 "$W/drive.log" 2>/dev/null; echo "--- p1-deepseek"; tail -n 4 "$W/p1-deepseek.log" 2>/dev/null
for log in "$W"/{olmoe,qwen3,qwen3-int4,olmoe-int4,gpt-oss-20b,deepseek-v2-lite,deepseek-v3-7l,census}.log "$W"/ab-*.log; do
    [[ -e $log ]] && { echo "--- $(basename "$log" .log)"; grep -E "bench: |saved|Error|error|kernels" "$log" | tail -n 12; }
done
[[ -e $W/done ]] && echo DONE || echo RUNNING
