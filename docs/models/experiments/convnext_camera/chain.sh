set -e
cd /work/main
D=/work/shared/data/ham10000; S=splits/ham10000_seed0.csv
for F in 0 1 2; do
  [ -f runs/xfit-camera-$F/history.json ] && [ "$(python3 -c "import json;print(len(json.load(open('runs/xfit-camera-$F/history.json'))))")" = 9 ] && continue
  R=""; [ -f runs/xfit-camera-$F/last.pt ] && R=--resume
  .venv/bin/dermtrain fit --config lite0-camera --train-seed 1 --holdout $F/3 --split $S --data $D --out runs/xfit-camera-$F $R > runs/xfit-camera-$F.log 2>&1
done
R=""; [ -f runs/convnext-femto-camera/last.pt ] && R=--resume
.venv/bin/dermtrain fit --config docs/models/experiments/convnext_camera/config.json --split $S --data $D --out runs/convnext-femto-camera $R > runs/convnext-femto-camera.log 2>&1
touch runs/chain_cc.done
