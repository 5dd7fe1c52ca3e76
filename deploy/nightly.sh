#!/usr/bin/env bash
# One night of one GPU kind (docs/nightly.md): the matrix on the Ray cluster, the run added to the shared
# history, the report with trends and change points, and a bisect opened for each new slowdown.
# Runs as a Ray job's entrypoint on the head node; tests/test_nightly_recipe.py runs it with the cluster
# commands (run --cluster, ray job submit) only parsed.
set -euo pipefail
: "${TWINBENCH_HISTORY:?the shared history, e.g. postgresql+psycopg://twinbench@history-db:5432/twinbench}"
: "${TWINBENCH_SRC:=/opt/twinbench}"  # the git checkout twinbench runs from: its commit is each run's git_sha
: "${GPU_KIND:=H100}"                 # Ray's accelerator_type of the nodes this night measures
: "${REPORTS:=/reports}"              # a volume every Ray pod mounts (bisect jobs write here too)
: "${RAY_DASHBOARD:=http://127.0.0.1:8265}"
NIGHT="$REPORTS/$(date -u +%Y-%m-%d)-$GPU_KIND"

git -C "$TWINBENCH_SRC" pull --ff-only --quiet
run_status=0
twinbench run --profile quick --cluster auto --cluster-resource "accelerator_type:$GPU_KIND" \
  --out "$NIGHT" --no-report || run_status=$?  # 1: a case failed parity or crashed; still recorded
twinbench history add "$NIGHT/results.json" --db "$TWINBENCH_HISTORY"
twinbench report "$NIGHT/results.json" --out "$NIGHT/report.html" --history "$TWINBENCH_HISTORY" \
  --markdown "$NIGHT/summary.md"
twinbench history show --db "$TWINBENCH_HISTORY" --json > "$NIGHT/change-points.json"
twinbench history show --db "$TWINBENCH_HISTORY"

# Each slowdown's bisect command (`history show` offers one per change point), opened once: a GPU job
# of the same kind that names the commit and writes its steps beside the night's report.
touch "$REPORTS/bisects-opened.txt"
python3 - "$NIGHT/change-points.json" "$REPORTS/bisects-opened.txt" > "$NIGHT/bisects-new.txt" <<'PY'
import json, sys
opened = set(open(sys.argv[2]).read().splitlines())
for series in json.load(open(sys.argv[1])):
    for cp in series["change_points"]:
        if cp.get("bisect") and cp["change_pct"] > 0 and cp["bisect"] not in opened:
            print(cp["bisect"])
PY
n=0
while read -r bisect; do
  n=$((n + 1))
  eval "set -- $bisect"  # history show quotes every word (shlex.join), so this splits it back, runs nothing
  ray job submit --address "$RAY_DASHBOARD" --no-wait --entrypoint-num-gpus 1 \
    --entrypoint-resources "{\"accelerator_type:$GPU_KIND\": 0.001}" \
    -- "$@" --repo "$TWINBENCH_SRC" --json "$NIGHT/bisect-$n.json"
  echo "$bisect" >> "$REPORTS/bisects-opened.txt"
done < "$NIGHT/bisects-new.txt"
echo "nightly: $NIGHT/report.html, $n bisect(s) opened"
exit "$run_status"
