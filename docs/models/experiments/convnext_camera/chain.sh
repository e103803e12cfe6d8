# The experiment's chain: the three camera fold teachers, then the student; each step a new run or the rest of a
# stopped one (`--continue`; on a finished run it trains nothing). Run from anywhere: bash .../convnext_camera/chain.sh
set -e
cd "$(dirname "$0")/../../../.."
D="${DERM_DATA:-../shared/data/ham10000}"; S=splits/ham10000_seed0.csv
fit() {  # fit OUT ARGS...
  local out=$1; shift
  .venv/bin/dermtrain fit --split $S --data "$D" --out "runs/$out" --continue "$@" > "runs/$out.log" 2>&1
}
for F in 0 1 2; do
  fit "xfit-camera-$F" --config lite0-camera --train-seed 1 --holdout "$F/3"
done
fit convnext-femto-camera --config docs/models/experiments/convnext_camera/config.json
