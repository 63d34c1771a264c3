#!/usr/bin/env bash
# Train the fast detector on real CAPTCHAs whose only label is their file name, and measure it on a held-out split:
#   split (1,000 held out, fixed seed, by file name) -> autolabel (colour, then the shipped synthetic detector on
#   what colour missed) -> train from the shipped checkpoint -> autolabel again with that model -> train on, from the
#   first model -> eval --json on the held-out split.
# Usage: bench/real_data.sh [DATA_DIR] [WORK_DIR]      (run from the repository root, the venv active)
# Environment: EPOCHS1, EPOCHS2 (epochs of the two rounds), BATCH, LR1, LR2, HOLDOUT, SEED, INIT (the weights
# round 1 starts from: the shipped synthetic checkpoint unless set; INIT=none starts from random weights).
# Nothing is written outside WORK_DIR (default runs/real, git-ignored): the images are linked, never copied.
set -euo pipefail

DATA=${1:-/work/shared/data/cs4243-train}
WORK=${2:-runs/real}
EPOCHS1=${EPOCHS1:-6}
EPOCHS2=${EPOCHS2:-3}
BATCH=${BATCH:-16}
LR1=${LR1:-1e-3}
LR2=${LR2:-5e-4}
HOLDOUT=${HOLDOUT:-1000}
SEED=${SEED:-0}
CQ=${CQ:-captcha-queue}
INIT=${INIT:-$(python -c "from core.checkpoint import default_checkpoint_path; print(default_checkpoint_path())")}

start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$WORK/times.log"; }

rm -rf "$WORK"
mkdir -p "$WORK"
stamp "split $DATA into $WORK/train and $WORK/val ($HOLDOUT held out, seed $SEED)"
python - "$DATA" "$WORK" "$HOLDOUT" "$SEED" <<'EOF'
import os, random, sys
from core.formats import list_images
data, work, holdout, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
names = [p.name for p in list_images(data)]
random.Random(seed).shuffle(names)
for part, chosen in (("val", names[:holdout]), ("train", names[holdout:])):
    os.makedirs(f"{work}/{part}")
    for name in chosen:
        os.symlink(os.path.abspath(f"{data}/{name}"), f"{work}/{part}/{name}")
print(f"{len(names) - holdout} training, {holdout} held-out images")
EOF

INIT_ARGS=(); LABEL_ARGS=()
if [ "$INIT" != none ]; then INIT_ARGS=(--init-from "$INIT"); LABEL_ARGS=(--checkpoint "$INIT"); fi

stamp "autolabel by colour${LABEL_ARGS:+, then with $INIT}"
$CQ autolabel "$WORK/train" --out "$WORK/labels1" --render-dir "$WORK/render" --render 12 "${LABEL_ARGS[@]}"

stamp "train round 1 ($EPOCHS1 epochs)"
$CQ train --images "$WORK/train" --labels "$WORK/labels1" --out "$WORK/round1/fast.safetensors" \
    "${INIT_ARGS[@]}" --epochs "$EPOCHS1" --batch-size "$BATCH" --lr "$LR1" --seed "$SEED" --device cpu

stamp "autolabel with the round-1 detector"
$CQ autolabel "$WORK/train" --out "$WORK/labels2" --checkpoint "$WORK/round1/fast.safetensors"

stamp "train round 2 ($EPOCHS2 epochs from round 1)"
$CQ train --images "$WORK/train" --labels "$WORK/labels2" --out "$WORK/round2/fast.safetensors" \
    --init-from "$WORK/round1/fast.safetensors" --epochs "$EPOCHS2" --batch-size "$BATCH" --lr "$LR2" \
    --seed "$SEED" --device cpu

stamp "eval on the held-out split"
$CQ eval --images "$WORK/val" --checkpoint "$WORK/round2/fast.safetensors" --device cpu --json | tee "$WORK/val.json"
stamp "done"
