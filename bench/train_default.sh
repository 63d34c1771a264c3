#!/usr/bin/env bash
# Reproduces the shipped checkpoint core/default_checkpoint/fast.{safetensors,json}:
# synthetic training, validation and test sets (fixed seeds), training of the `fast` network, evaluation on the
# fresh test set, then the copy into the package. Rerun it whenever the network or the generator changes.
#
#   bash bench/train_default.sh   # everything (about four and a half hours on 2 free CPU cores); an interrupted run continues
#                                 # with the phase where it stopped when started again
#
# Variables: WORK (scratch folder), DEVICE (auto | cpu | cuda), WORKERS (DataLoader processes), INSTALL=0 to
# train and evaluate without copying into core/default_checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${WORK:-/tmp/captcha-default}
DEVICE=${DEVICE:-auto}
WORKERS=${WORKERS:-1}
CQ=${CQ:-.venv/bin/captcha-queue}

# data: the seeds make every file byte-identical on every machine
TRAIN_COUNT=60000; TRAIN_SEED=1000
VAL_COUNT=500;     VAL_SEED=1001
TEST_COUNT=1000;   TEST_SEED=1002
# schedule, phase 1: EPOCHS epochs of EPOCH_SIZE images drawn from the training set (warmup, then cosine decay);
# phase 2: a second, longer cosine schedule starting from phase 1's best weights, on a fresh shuffle (seed 1)
EPOCHS=9;   EPOCH_SIZE=5000; BATCH=16; LR=2e-3; SEED=0
EPOCHS2=18; LR2=1e-3;        SEED2=1; EMA2=0.998
# phase 2 adds the context head (core/models/context.py) to phase 1's network; its other weights carry over
MODEL2='{"context_layers": 2}'
# phase 3 adds the glyph reader (core/models/reader.py) and trains only it and a fresh context head over it, the
# detector frozen (--train-parts reader): EPOCHS3 epochs of EPOCH_SIZE3 images, batches of BATCH3
EPOCHS3=14; EPOCH_SIZE3=12000; BATCH3=32; LR3=3e-3; SEED3=2; EMA3=0.998
MODEL3='{"reader_width": 128}'
# phase 4 continues phase 3 (reader and context head only) on a second cosine schedule at half the rate
EPOCHS4=10; LR4=1.5e-3; SEED4=3
# phase 5 continues phase 4 (reader and context head only) on a third, longer cosine schedule
EPOCHS5=30; LR5=1e-3; SEED5=4
# then the shipped checkpoint: phase 5's weights, their glyph reader reading in eval every crop upright and, where
# that view's top class probability is below 0.95, also turned 7 degrees either way (the mean of its vectors; no
# training, see captcha-queue reconfigure)
VIEWS='{"reader_views": [0.0, 7.0, -7.0], "reader_view_gate": 0.95}'

mkdir -p "$WORK"
[ -d "$WORK/train" ] || $CQ synth "$WORK/train" --count $TRAIN_COUNT --seed $TRAIN_SEED --quiet
[ -d "$WORK/val" ]   || $CQ synth "$WORK/val"   --count $VAL_COUNT   --seed $VAL_SEED   --quiet
[ -d "$WORK/test" ]  || $CQ synth "$WORK/test"  --count $TEST_COUNT  --seed $TEST_SEED  --quiet

DATA=(--images "$WORK/train/images" --labels "$WORK/train/labels"
      --val-images "$WORK/val/images" --val-labels "$WORK/val/labels"
      --arch fast --epoch-size $EPOCH_SIZE --batch-size $BATCH --device "$DEVICE" --workers "$WORKERS")

if [ ! -f "$WORK/phase1.done" ]; then  # phase 1 resumes by itself when interrupted
  $CQ train "${DATA[@]}" --epochs $EPOCHS --lr $LR --seed $SEED --out "$WORK/phase1.safetensors" \
    $( [ -f "$WORK/phase1.state.json" ] && echo --resume )
  touch "$WORK/phase1.done"
fi

if [ ! -f "$WORK/phase2.done" ]; then
  $CQ train "${DATA[@]}" --epochs $EPOCHS2 --lr $LR2 --seed $SEED2 --init-from "$WORK/phase1.safetensors" \
    --ema-decay $EMA2 --model-config "$MODEL2" --out "$WORK/phase2.safetensors" \
    $( [ -f "$WORK/phase2.state.json" ] && echo --resume )
  touch "$WORK/phase2.done"
fi

DATA3=(--images "$WORK/train/images" --labels "$WORK/train/labels"
       --val-images "$WORK/val/images" --val-labels "$WORK/val/labels"
       --arch fast --epoch-size $EPOCH_SIZE3 --batch-size $BATCH3 --device "$DEVICE" --workers "$WORKERS")
if [ ! -f "$WORK/phase3.done" ]; then
  $CQ train "${DATA3[@]}" --epochs $EPOCHS3 --lr $LR3 --seed $SEED3 --init-from "$WORK/phase2.safetensors" \
    --ema-decay $EMA3 --model-config "$MODEL3" --train-parts reader --out "$WORK/phase3.safetensors" \
    $( [ -f "$WORK/phase3.state.json" ] && echo --resume )
  touch "$WORK/phase3.done"
fi

if [ ! -f "$WORK/phase4.done" ]; then
  $CQ train "${DATA3[@]}" --epochs $EPOCHS4 --lr $LR4 --seed $SEED4 --init-from "$WORK/phase3.safetensors" \
    --ema-decay $EMA3 --train-parts reader --out "$WORK/phase4.safetensors" \
    $( [ -f "$WORK/phase4.state.json" ] && echo --resume )
  touch "$WORK/phase4.done"
fi

if [ ! -f "$WORK/phase5.done" ]; then
  $CQ train "${DATA3[@]}" --epochs $EPOCHS5 --lr $LR5 --seed $SEED5 --init-from "$WORK/phase4.safetensors" \
    --ema-decay $EMA3 --train-parts reader --out "$WORK/phase5.safetensors" \
    $( [ -f "$WORK/phase5.state.json" ] && echo --resume )
  touch "$WORK/phase5.done"
fi

$CQ reconfigure "$WORK/phase5.safetensors" --set "$VIEWS" --out "$WORK/fast.safetensors"

$CQ eval --images "$WORK/test/images" --checkpoint "$WORK/fast.safetensors" --device "$DEVICE" --json \
  | tee "$WORK/eval.json"

if [ "${INSTALL:-1}" = 1 ]; then
  mkdir -p core/default_checkpoint
  cp "$WORK/fast.safetensors" core/default_checkpoint/fast.safetensors
  cp "$WORK/fast.json" core/default_checkpoint/fast.json
  echo "installed core/default_checkpoint/fast.safetensors ($(du -h core/default_checkpoint/fast.safetensors | cut -f1))"
fi
