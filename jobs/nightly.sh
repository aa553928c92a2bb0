#!/bin/sh
# One night of jobs/nightly_eval.yaml: run it into a new folder, compare with the night before, and exit
# with what an alert needs: the run's code (0 ok, 1 failed rows, 2 nothing ran, 3 stopped early) when
# it is not 0, else compare's (0 within the thresholds, 4 a threshold crossed).
# Cron, systemd and Hugging Face Jobs call this script (docs/nightly.md).
set -u
cd "$(dirname "$0")/.."
BATCHRUN=${BATCHRUN:-batchrun}
FAIL_IF=${FAIL_IF:-changed>0.2,failed_rate>0.01,p95_latency>1.5x}

$BATCHRUN run jobs/nightly_eval.yaml --progress lines --compare-with previous
code=$?
[ "$code" -eq 0 ] || exit "$code"
set -- $(ls -d out/nightly/*/ | tail -n 2)
[ "$#" -eq 2 ] || exit 0                       # the first night has nothing to compare with
$BATCHRUN compare "$1" "$2" --html "$2/compare.html" --fail-if "$FAIL_IF"
