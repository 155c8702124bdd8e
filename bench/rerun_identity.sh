#!/usr/bin/env bash
# Bit-identical reruns on real data. In a scratch clone of HEAD (the working tree is not touched),
# point `fetch` at ARCHIVE, apply the KEY=VALUE params, then run `dvc repro --force` twice; after
# each run, print the sha256 of all the model's weights and of every report and prepared array.
# Exits 0 if the two runs agree byte for byte, 1 if not.
#
# Usage: bench/rerun_identity.sh ARCHIVE MD5 [KEY=VALUE ...]
#   e.g. bench/rerun_identity.sh /data/cifar-10-binary.tar.gz <md5> train.epochs=1 train.jit_compile=true
# Needs the project's .venv (make setup).
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,9p' "$0" >&2
  exit 2
fi
archive=$(realpath "$1")
md5=$2
shift 2
project=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
git clone --quiet "$project" "$scratch/project"
cd "$scratch/project"
export PATH="$project/.venv/bin:$PATH" PYTHONPATH="$scratch/project/src"
python - "fetch.url=$archive" "fetch.md5=$md5" "$@" <<'PY'
import sys

import yaml

params = yaml.safe_load(open("params.yaml"))
for assignment in sys.argv[1:]:
    key, _, value = assignment.partition("=")
    *sections, name = key.split(".")
    target = params
    for section in sections:
        target = target[section]
    if name not in target:
        sys.exit(f"unknown param {key}")
    target[name] = yaml.safe_load(value)
yaml.safe_dump(params, open("params.yaml", "w"), sort_keys=False)
PY

digest() {
  python - <<'PY'
import keras

from alexnet8.network import weights_digest

print(weights_digest(keras.models.load_model("models/model.keras")), " model weights")
PY
  sha256sum reports/*.json reports/*.csv data/prepared/*.npy
}

for attempt in 1 2; do
  echo "run $attempt: dvc repro --force ($*)"
  /usr/bin/time -f "run $attempt: %e s wall, peak RSS %M KB" dvc repro --force > "repro-$attempt.log" 2>&1 || {
    tail -30 "repro-$attempt.log"
    exit 1
  }
  grep -E "step -|test accuracy|wall" "repro-$attempt.log" || true
  digest > "digest-$attempt.txt"
done
cat digest-1.txt
if cmp --quiet digest-1.txt digest-2.txt; then
  echo "IDENTICAL: weights, reports and prepared arrays"
else
  diff digest-1.txt digest-2.txt || true
  echo "DIFFERENT"
  exit 1
fi
