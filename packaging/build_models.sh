#!/usr/bin/env bash
# Reproduces the shipped models on 2 CPU cores, one training at a time (two at once halve each other, and two
# PyTorch jobs fighting over the cores run 5x slower each):
#   default   EfficientNet-Lite0 @192 fine-tuned from a 12-view feature bank at peak lr 3e-3 with mixup of the bank
#             features and mild camera augmentation (blur / sharpening, JPEG 60-99), distilled from two teachers trained
#             the same way (runs/lite0-camera-kd-s2, ~2 h 7 min on an AVX-512 CPU: the Lite0 teacher
#             runs/lite0-mixup-camera-mild-s1 31 min with its bank, the Lite1 @240 teacher runs/lite1-camera-s1 62 min
#             with its bank, their targets 22 min, the student 12 min; docs/models/experiments/lite0_camera_kd/).
#             The default until 2026-12-04: the same three commands with lite0-mixup / lite1-mixup, no camera
#             augmentation (runs/lite0-mixup-kd-s2, ~3 h 6 min on an AVX2 CPU; docs/models/experiments/lite0_mixup_kd/):
#              `fit lite0-mixup-s1 lite0-mixup --train-seed 1`, `fit lite1-mixup-s1 lite1-mixup --train-seed 1`,
#              `fit lite0-mixup-kd-s2 lite0-mixup --train-seed 2 --teachers runs/lite0-mixup-s1 runs/lite1-mixup-s1`.
#             The default until 2026-12-02 (second): `fit lite0-fast lite0-fast` (docs/models/experiments/lite0_fast/)
#   convnext  ConvNeXt-Femto @160 from scratch, distilled with a feature hint (runs/convnext-femto, ~3 h 10 min:
#             a 12-view Lite0 bank 18 min, three fold teachers runs/xfit-0..2 41 min, their targets 7 min, 2 h 1 min)
#   ensemble  the three teachers in one graph: Lite0 @192 from a 6-view bank (runs/lite0-bank, ~45 min; the default
#             until 2026-12-02), Lite1 @240 (runs/lite1-bank, ~50 min) and Lite2 @260
#             (runs/lite2-bank, ~80 min); nothing trained for it, calibrated on validation by `dermconvert ensemble`;
#             built into build/models (50 MB), not packaged
# then evaluates each on the test split (plain and with test-time flips), converts with the FP16 gate, installs
# the bundles into engines/models, and regenerates the cards and the comparison table.
# The distilled ConvNeXt (`--config convnext-distill --teachers runs/lite0-bank`) is not shipped: stopped at 16 of
# 25 epochs it reached 45.8% validation balanced accuracy against 52.9% for the from-scratch one.
# The Lite1 teacher alone: `fit lite1-bank lite1-bank --epochs 8` (28 min from its bank, validation 68.4% and, on a
# second machine, 69.9%), then `python bench/ensemble.py runs/lite0-bank runs/lite1-bank` (validation 71.2%;
# docs/models/experiments/teachers.md). Experiments (docs/ablation.md): `fit lite0-f3 lite0-bank --freeze-at 3`
# (block 3 trained too: 68.3%, no gain), and a Lite0 student distilled from lite0-f3 + lite1-bank:
# `fit lite0-f3-kd lite0-bank --freeze-at 3 --epochs 10 --teachers runs/lite0-f3 runs/lite1-bank`; 12 views per image:
# `fit lite0-v12 lite0-bank --views 12` (69.9%, gone by epoch 15) and `... --views 12 --epochs 9` (68.2%): not shipped;
# a second ConvNeXt student from those two teachers:
# `fit convnext-kd2 docs/models/experiments/convnext_distill_2/config.json` (43.8%, stopped at 15 of 25 epochs);
# teachers cross-fitted on 3 lesion folds, `fit xfit-F lite0-bank --views 12 --epochs 10 --holdout F/3` for F = 0..2
# (62.8-63.7% each), and a third ConvNeXt student from their out-of-fold targets:
# `fit convnext-xfit docs/models/experiments/convnext_distill_2/config.json --views 12 --epochs 20
#  --teachers runs/xfit-0 runs/xfit-1 runs/xfit-2` (42.7%) and a Lite0 one, `fit lite0-xfit lite0-bank --views 12
#  --epochs 10 --teachers runs/xfit-0 runs/xfit-1 runs/xfit-2` (67.4%): not shipped. The previous convnext,
# from scratch with the two-phase recipe (52.9%): `fit convnext_atto cpu` (docs/models/experiments/convnext_scratch/),
# the same hinted student on ConvNeXt-Atto at 128 px (62.2%): `fit convnext-hint128 docs/models/experiments/convnext_hint128/config.json`
# and at 160 px (63.5%, shipped until 2026-12-02): `fit convnext-hint docs/models/experiments/convnext_atto160/config.json`.
# Mixup seed 0 (70.9%, not shipped): `fit lite0-mixup lite0-mixup` (docs/models/experiments/lite0_mixup/).
# Not shipped either (docs/ablation.md): 160 px, `fit lite0-mixup160-s1 lite0-mixup --img-size 160 --train-seed 1`
# (68.6%); no label smoothing, `fit lite0-mixup-nols-s1 docs/models/experiments/lite0_mixup_nols/config.json
#  --train-seed 1` (72.1% at epoch 4, 70.5% over epochs 4-9 against 71.8%); mixup alpha 0.1,
# `fit lite0-mixup01-s1 docs/models/experiments/lite0_mixup01/config.json --train-seed 1` (71.1%, 70.4% over 4-9);
# 224 px, `fit lite0-mixup224-s1 lite0-mixup --img-size 224 --train-seed 1` (71.3%, 71.1% over 4-9);
# drop path 0.2, `fit lite0-mixup-dp-s1 docs/models/experiments/lite0_mixup_dp/config.json --train-seed 1` (71.0% over 4-9);
# mixup + CutMix, `fit lite0-mixcut-s1 docs/models/experiments/lite0_mixcut/config.json --train-seed 1` (69.8% over 4-9);
# end-to-end fine-tunes of the shipped run, `fit lite0-mixup-ft-s1 docs/models/experiments/lite0_mixup_ft/config.json
#  --train-seed 1` (64.6%) and `.../lite0_mixup_ft_bn/config.json` (71.8%, from 73.5%).
# The mixup teacher Lite1 @240, `fit lite1-mixup-s1 lite1-mixup --train-seed 1` (75.4%, 73.5% over 4-9; 11.1 ms, over
# the default's 10 ms), with the previous default: `python bench/ensemble.py runs/lite0-mixup-s1 runs/lite1-mixup-s1` (75.8%;
# docs/models/experiments/teachers_mixup.md). At 192 px (8.0 ms, 71.4% over 4-9: rejected):
#  `fit lite1-mixup192-s1 lite1-mixup --img-size 192 --train-seed 1`. Seed 0 (70.0% over 4-9, level with Lite0):
#  `fit lite1-mixup-s0 lite1-mixup`. The default's recipe distilled from that pair on the other two seeds (72.7 / 71.9%
#  over 4-9 on seeds 1 / 0, against 73.1% for the shipped seed 2: docs/models/experiments/lite0_mixup_kd/):
#  `fit lite0-mixup-kd-s1 lite0-mixup --train-seed 1 --teachers runs/lite0-mixup-s1 runs/lite1-mixup-s1` (and 0).
# The same student for 18 epochs (73.6% over 16-18 against 73.3% over 7-9: not shipped; docs/models/experiments/lite0_kd_long/):
#  `fit lite0-mixup-kd18-s2 lite0-mixup --epochs 18 --train-seed 2 --teachers runs/lite0-mixup-s1 runs/lite1-mixup-s1`.
# The shipped convnext's preset from those two teachers (63.2%, not shipped; docs/models/experiments/convnext_femto_mkd/):
#  `fit convnext-femto-mkd convnext-hint --teachers runs/lite0-mixup-s1 runs/lite1-mixup-s1`.
# The default's student from four camera teachers (73.3% over 4-9 against 74.3% on seed 2: rejected;
# docs/models/experiments/lite0_kd4/): `fit lite0-mixup-camera-mild-s0 lite0-camera --train-seed 0` (and s2, seed 2), then
# `fit lite0-kd4-s2 lite0-camera --train-seed 2 --teachers runs/lite0-mixup-camera-mild-s0
# runs/lite0-mixup-camera-mild-s1 runs/lite0-mixup-camera-mild-s2 runs/lite1-camera-s1`.
# The FP16 files of both shipped models are gated by `dermconvert derive engines/models/M.onnx --fp16 --int8 ...`
# (INT8 fails its gate for both: docs/int8.md).
#   DERM_DATA=../shared/data/ham10000 bash packaging/build_models.sh [train|ship]
# Every step resumes: a stopped `fit` continues from its last epoch (`--continue`).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DERM_DATA:-../shared/data/ham10000}"
SPLIT=splits/ham10000_seed0.csv
BIN=.venv/bin
stage="${1:-all}"

fit() {  # fit RUN CONFIG [args...]: train, or continue a stopped run
  local run=$1 config=$2
  shift 2
  $BIN/dermtrain fit --config "$config" --data "$DATA" --split $SPLIT --out "runs/$run" --continue "$@"
}

if [ "$stage" = all ] || [ "$stage" = train ]; then
  # the Lite0 teacher is the camera experiment's seed-1 run: its config equals the preset lite0-camera
  fit lite0-mixup-camera-mild-s1 lite0-camera --train-seed 1
  fit lite1-camera-s1 lite1-camera --train-seed 1
  fit lite0-camera-kd-s2 lite0-camera --train-seed 2 --teachers runs/lite0-mixup-camera-mild-s1 runs/lite1-camera-s1
  fit lite0-bank lite0-bank
  for f in 0 1 2; do fit xfit-$f lite0-bank --views 12 --epochs 10 --holdout $f/3; done
  fit convnext-femto convnext-hint
  fit lite1-bank lite1-bank --epochs 8
  fit lite2-bank lite2-bank --epochs 8
fi

if [ "$stage" = all ] || [ "$stage" = ship ]; then
  mkdir -p build/models
  for run in lite0-camera-kd-s2 convnext-femto; do
    $BIN/dermtrain eval runs/$run --data "$DATA" --split-name test --quiet
    $BIN/dermtrain eval runs/$run --data "$DATA" --split-name test --tta flip --quiet
    $BIN/dermconvert runs/$run --onnx build/models/$run.onnx --fp16 --data "$DATA"
  done
  cp build/models/lite0-camera-kd-s2.onnx engines/models/efficientnet_lite0.onnx
  cp build/models/convnext-femto.onnx engines/models/convnext_femto.onnx
  # the gated FP16 files travel with them (dermconvert deletes one that fails its gate)
  for pair in lite0-camera-kd-s2:efficientnet_lite0 convnext-femto:convnext_femto; do
    src=build/models/${pair%%:*}.fp16.onnx
    if [ -f "$src" ]; then cp "$src" "engines/models/${pair##*:}.fp16.onnx"; else rm -f "engines/models/${pair##*:}.fp16.onnx"; fi
  done
  $BIN/python bench/model_card.py runs/lite0-camera-kd-s2 build/models/lite0-camera-kd-s2.onnx --name default \
    --title "EfficientNet-Lite0 @ 192 px, feature-bank fine-tuning with mixup and camera augmentation, distilled from two teachers (the default model)" \
    --out docs/models/efficientnet_lite0.md --notes docs/models/notes/efficientnet_lite0.md \
    --copy-run docs/models/efficientnet_lite0/ --installed engines/models/efficientnet_lite0.onnx
  $BIN/python bench/model_card.py runs/convnext-femto build/models/convnext-femto.onnx --name convnext \
    --title "ConvNeXt-Femto @ 160 px, from scratch, distilled from Lite0 teachers with a feature hint" \
    --out docs/models/convnext_femto.md --notes docs/models/notes/convnext_femto.md \
    --copy-run docs/models/convnext_femto/ --installed engines/models/convnext_femto.onnx
  for run in lite0-bank lite1-bank lite2-bank; do
    $BIN/dermconvert runs/$run --onnx build/models/$run.onnx --data "$DATA"
  done
  $BIN/dermconvert ensemble build/models/lite0-bank.onnx build/models/lite1-bank.onnx build/models/lite2-bank.onnx \
    --onnx build/models/teachers3.onnx --fp16 --data "$DATA" --split $SPLIT
  for tta in none flip; do
    $BIN/dermtrain eval build/models/teachers3.onnx --data "$DATA" --split $SPLIT --out runs/teachers3-eval --tta $tta --quiet
  done
  # not packaged (50 MB, over the size a package ships): `dermscan FOLDER --model build/models/teachers3.onnx`
  $BIN/python bench/model_card.py runs/teachers3-eval build/models/teachers3.onnx --name build/models/teachers3.onnx \
    --title "The three EfficientNet-Lite teachers in one bundle (for archive scans; built, not packaged)" \
    --out docs/models/ensemble.md --notes docs/models/notes/ensemble.md \
    --copy-run docs/models/ensemble/ --installed build/models/teachers3.onnx
  $BIN/python bench/compare_models.py default=runs/lite0-camera-kd-s2:build/models/lite0-camera-kd-s2.onnx \
    convnext=runs/convnext-femto:build/models/convnext-femto.onnx \
    ensemble=runs/teachers3-eval:build/models/teachers3.onnx --scan "$DATA/images" \
    --out docs/models/comparison.md
fi
