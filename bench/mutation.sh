#!/usr/bin/env bash
# Mutation testing of the pure logic under the fast tier: mutmut 3 (configured in pyproject.toml,
# [tool.mutmut]) mutates evaluation, splits/groups/mask, promotion selection, config validation
# and the serving input policy, one module at a time; the summary goes to bench/results/mutation.md.
#   bench/mutation.sh                     all ten modules (hours on 2 shared cores)
#   (the summary counts the in-scope mutants only; "not checked" = not run yet)
#   bench/mutation.sh dtl.evaluation.stats dtl.evaluation.metrics   only these (the cached verdicts of others are kept)
# JOBS (default 1) is mutmut's --max-children; FRESH=1 deletes mutants/ first (a clean run);
# RECHECK=1 reruns only the mutants the committed report did not list as killed and carries its kills
# over; where the mutated sources changed since, every mutant of a changed function is rerun and only
# the other functions' kills are carried (refused when no commit holds the report's sources:
# bench/mutation_report.py). ALSO="glob ..." adds mutants to rerun (e.g. the functions a changed one
# relies on).
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
# mutmut forks each mutant's test run from a process that has run torch: an OpenMP pool started there
# deadlocks the child's first parallel op (a conv's init), which mutmut then reports as a timeout.
# One thread each keeps the children from hanging (and JOBS children from oversubscribing the cores).
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
export DTL_SHARED_DATASETS=${DTL_SHARED_DATASETS:-$(cd .. && pwd)/shared/datasets}  # mutants/ has no ../shared
export MUTATION_SCOPE="$(for m in $ORDER; do echo "${SCOPE[$m]}"; done)"
COMMAND="bench/mutation.sh $*"
CARRY=()
if [ "${RECHECK:-0}" = 1 ]; then
  # Rerun only what the committed report did not list as killed, and carry its kills over.
  git show HEAD:bench/results/mutation.md > mutants.previous.md
  CARRY=(mutants.previous.md)
  COMMAND="RECHECK=1 ${ALSO:+ALSO=\"$ALSO\" }$COMMAND"
fi
[ "${FRESH:-0}" = 1 ] && rm -rf mutants
for m in $MODULES; do
  [ -n "${SCOPE[$m]:-}" ] || { echo "unknown module $m; choose from: $ORDER" >&2; exit 2; }
  echo "== $m"
  if [ "${RECHECK:-0}" = 1 ]; then
    names=$(python -m bench.mutation_report recheck mutants.previous.md "$m")  # alone: a refusal stops the script
    names="$names $(set -f; for g in ${ALSO:-}; do case $g in "$m".*) echo "$g";; esac; done)"
    [ -n "${names// /}" ] || { echo "   nothing to recheck"; continue; }
  else
    names=${SCOPE[$m]}
  fi
  # shellcheck disable=SC2086 # the globs are mutmut's, not the shell's
  (set -f; nice -n 10 mutmut run --max-children "${JOBS:-1}" $names) | tail -n 3 || true
done
mkdir -p bench/results
python -m bench.mutation_report report "$(date -u +%F)" "${COMMAND% }" "${CARRY[@]}" > bench/results/mutation.md.new
mv bench/results/mutation.md.new bench/results/mutation.md
rm -f mutants.previous.md
sed -n '1,/^## /p' bench/results/mutation.md
