#!/usr/bin/env bash
# Mutation testing of the pure logic under the fast tier: mutmut 3 (configured in pyproject.toml,
# [tool.mutmut]) mutates evaluation, splits/groups/mask, promotion selection, config validation
# and the serving input policy, one module at a time; the summary goes to bench/results/mutation.md.
#   bench/mutation.sh                     all ten modules (hours on 2 shared cores)
#   (the summary counts the in-scope mutants only; "not checked" = not run yet)
#   bench/mutation.sh dtl.evaluation.stats dtl.evaluation.metrics   only these (the cached verdicts of others are kept)
# JOBS (default 1) is mutmut's --max-children; FRESH=1 deletes mutants/ first (a clean run).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v mutmut >/dev/null || { echo "mutmut not found: pip install -e '.[mutation]'" >&2; exit 2; }
# Mutant names are module.x_function__mutmut_N (methods: module.xǁClassǁmethod__mutmut_N).
# Whole modules, except plotting; of tracking/promotion.py the selection only; of model/decode.py the input policy.
declare -A SCOPE=(
  [dtl.evaluation.stats]="dtl.evaluation.stats.*"
  [dtl.evaluation.metrics]="$(printf 'dtl.evaluation.metrics.x_%s__* ' direction expected_calibration_error _binary_auc _confusion_counts \
                 accuracy_macro_f1 point_metrics evaluate_predictions confusion)"
  [dtl.evaluation.calibration]="$(printf 'dtl.evaluation.calibration.x_%s__* ' softmax nll fit_temperature supported reliability)"
  [dtl.data.splits]="dtl.data.splits.*"
  [dtl.data.groups]="dtl.data.groups.*"
  [dtl.model.mask]="dtl.model.mask.*"
  [dtl.tracking.policy]="dtl.tracking.policy.x_load_policy__*"
  [dtl.tracking.promotion]="dtl.tracking.promotion.x__key__* dtl.tracking.promotion.x_select__*"
  [dtl.config]="dtl.config.*"
  [dtl.model.decode]="$(printf 'dtl.model.decode.x_%s__* ' truthy image_from_value _array_image _read_path _b64 decode_image_bytes \
                 _rows read_images) dtl.model.decode.xǁInputPolicyǁ* dtl.model.decode.xǁInvalidInputǁ*"
)
ORDER="dtl.evaluation.stats dtl.evaluation.metrics dtl.evaluation.calibration dtl.data.splits dtl.model.mask dtl.data.groups dtl.tracking.policy dtl.tracking.promotion dtl.config dtl.model.decode"
MODULES=${*:-$ORDER}
unset PYTHONPATH  # the tests must import the mutated copy in mutants/, not this checkout
export DTL_SHARED_DATASETS=${DTL_SHARED_DATASETS:-$(cd .. && pwd)/shared/datasets}  # mutants/ has no ../shared
[ "${FRESH:-0}" = 1 ] && rm -rf mutants
for m in $MODULES; do
  echo "== $m"
  # shellcheck disable=SC2086 # the globs are mutmut's, not the shell's
  (set -f; nice -n 10 mutmut run --max-children "${JOBS:-1}" ${SCOPE[$m]}) | tail -n 3 || true
done
export MUTATION_SCOPE="$(for m in $ORDER; do echo "${SCOPE[$m]}"; done)"
mkdir -p bench/results
python - "$(date -u +%F)" "$*" > bench/results/mutation.md <<'PY'
"""Per-module counts of mutmut's verdicts, and the surviving mutants, from mutants/**/*.meta."""
import json
import sys
from collections import Counter
from pathlib import Path

import fnmatch
import os

from mutmut.stats import status_by_exit_code

scope = os.environ["MUTATION_SCOPE"].split()
rows, survivors = [], []
for meta in sorted(Path("mutants").rglob("*.py.meta")):
    codes = {k: v for k, v in json.loads(meta.read_text())["exit_code_by_key"].items()
             if any(fnmatch.fnmatchcase(k, g) for g in scope)}
    c = Counter(status_by_exit_code[v] for v in codes.values())
    module = str(meta.relative_to("mutants"))[:-len(".py.meta")].replace("/", ".")
    rows.append((module, len(codes), c))
    survivors += sorted(k for k, v in codes.items() if status_by_exit_code[v] == "survived")
cols = ["killed", "survived", "timeout", "no tests", "not checked", "suspicious", "skipped"]
print(f"# Mutation run {sys.argv[1]}\n\n`bench/mutation.sh {sys.argv[2]}`".rstrip() + " (mutmut 3, fast tier)\n")
print("| module | mutants | " + " | ".join(cols) + " | killed share of checked |")
print("|---" * (len(cols) + 3) + "|")
total = Counter()
for module, n, c in rows:
    total += c
    checked = c["killed"] + c["survived"] + c["timeout"]
    share = f"{(c['killed'] + c['timeout']) / checked:.1%}" if checked else "–"
    print(f"| {module} | {n} | " + " | ".join(str(c[k]) for k in cols) + f" | {share} |")
checked = total["killed"] + total["survived"] + total["timeout"]
print(f"| all | {sum(r[1] for r in rows)} | " + " | ".join(str(total[k]) for k in cols)
      + f" | {(total['killed'] + total['timeout']) / max(checked, 1):.1%} |")
print("\n## Survivors (`mutmut show NAME` prints the diff)\n")
print("\n".join(f"- `{s}`" for s in survivors) or "none")
PY
cat bench/results/mutation.md | head -20
