#!/usr/bin/env bash
# Train the fast detector on real CAPTCHAs whose only label is their file name, and measure it on a held-out split:
#   split (1,000 held out, fixed seed, by file name) -> autolabel (colour, then the shipped synthetic detector on
#   what colour missed) -> train from the shipped checkpoint -> eval --json on the held-out split.
#   With EPOCHS2 > 0 a second round labels again with the first model and trains on from it.
# Usage: bench/real_data.sh [DATA_DIR] [WORK_DIR]      (run from the repository root, the venv active)
# Environment: EPOCHS1, EPOCHS2 (epochs of the two rounds; EPOCHS2=0, the default: one round), BATCH, LR1, LR2,
# HOLDOUT, SEED, INIT (the weights round 1 starts from: the shipped synthetic checkpoint unless set; INIT=none starts
# from random weights), AUGMENT (1, the default: train --augment; 0: without), EMA (train --ema-decay EMA, default
# 0.998; 0: none). Training runs in bf16 where the CPU has it natively (train --precision auto).
# Nothing is written outside WORK_DIR (default runs/real, git-ignored): the images are linked, never copied.
set -euo pipefail

DATA=${1:-/work/shared/data/cs4243-train}
WORK=${2:-runs/real}
EPOCHS1=${EPOCHS1:-20}
EPOCHS2=${EPOCHS2:-0}
BATCH=${BATCH:-16}
LR1=${LR1:-1e-3}
LR2=${LR2:-5e-4}
HOLDOUT=${HOLDOUT:-1000}
SEED=${SEED:-0}
CQ=${CQ:-captcha-queue}
AUGMENT=${AUGMENT:-1}
EMA=${EMA:-0.998}
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

TRAIN_ARGS=(--batch-size "$BATCH" --seed "$SEED" --device cpu)
if [ "$AUGMENT" = 1 ]; then TRAIN_ARGS+=(--augment); fi
if [ "$EMA" != 0 ]; then TRAIN_ARGS+=(--ema-decay "$EMA"); fi
INIT_ARGS=(); LABEL_ARGS=()
if [ "$INIT" != none ]; then INIT_ARGS=(--init-from "$INIT"); LABEL_ARGS=(--checkpoint "$INIT"); fi

stamp "autolabel by colour${LABEL_ARGS:+, then with $INIT}"
$CQ autolabel "$WORK/train" --out "$WORK/labels1" --render-dir "$WORK/render" --render 12 "${LABEL_ARGS[@]}"

stamp "train round 1 ($EPOCHS1 epochs)"
$CQ train --images "$WORK/train" --labels "$WORK/labels1" --out "$WORK/round1/fast.safetensors" \
    "${INIT_ARGS[@]}" --epochs "$EPOCHS1" --lr "$LR1" "${TRAIN_ARGS[@]}"

FINAL="$WORK/round1/fast.safetensors"
if [ "$EPOCHS2" -gt 0 ]; then
    stamp "autolabel with the round-1 detector"
    $CQ autolabel "$WORK/train" --out "$WORK/labels2" --checkpoint "$WORK/round1/fast.safetensors"

    stamp "train round 2 ($EPOCHS2 epochs from round 1)"
    $CQ train --images "$WORK/train" --labels "$WORK/labels2" --out "$WORK/round2/fast.safetensors" \
        --init-from "$WORK/round1/fast.safetensors" --epochs "$EPOCHS2" --lr "$LR2" "${TRAIN_ARGS[@]}"
    FINAL="$WORK/round2/fast.safetensors"
fi

stamp "eval $FINAL on the held-out split"
$CQ eval --images "$WORK/val" --checkpoint "$FINAL" --device cpu --json | tee "$WORK/val.json"
stamp "done"
