#!/usr/bin/env bash
# Train the fast detector on real CAPTCHAs whose only label is their file name, and measure it on a held-out split:
#   split (1,000 held out, fixed seed, by file name) -> autolabel (colour, then the shipped synthetic detector on
#   what colour missed) -> train the glyph reader (and context head) on the real characters, the shipped synthetic
#   detector frozen -> eval --json on the held-out split.
#   With EPOCHS1 > 0 the whole network first trains on the real images (round 1), the reader round follows from it;
#   with EPOCHS2 > 0 a second whole-network round labels again with the first model and trains on from it.
# Usage: bench/real_data.sh [DATA_DIR] [WORK_DIR]      (run from the repository root, the venv active)
# Environment: READER_EPOCHS (epochs of the reader round, default 20; 0: none), READER_BATCH, READER_LR, EPOCHS1,
# EPOCHS2 (epochs of the whole-network rounds, default 0), BATCH, LR1, LR2, HOLDOUT, SEED, INIT (the weights
# everything starts from: the shipped synthetic checkpoint unless set; INIT=none starts round 1 from random weights),
# AUGMENT (1, the default: train --augment; 0: without), EMA (train --ema-decay EMA, default 0.998; 0: none),
# SYNTH (synthetic images mixed into the reader round, default 0; SYNTH_SEED, default 5; an epoch stays as many
# samples as there are real training images, drawn from both), READER_CONFIG (train --model-config of the reader
# round, default '{"reader_width": 128, "reader_crop": 32, "reader_resolution": "original"}': the reader reads 32 x 32
# crops instead of the shipped 24 x 24, of each image at its own size instead of the detector's input height), BOXES
# (the box_source of the final checkpoint: colour, the default, or both; detector: none written; see "Train on your
# own CAPTCHAs" in the README), BOTH_GATE (with BOXES=both, the both_gate of the final checkpoint: detect only where
# the colour reading has a character below it; default 1: every image).
# DEVICE (cpu, the default; cuda on a GPU: autolabel's detector, training and eval run there), WORKERS (DataLoader
# processes of the training runs, default 1).
# Training runs in bf16 where the CPU or GPU has it natively (train --precision auto).
# Nothing is written outside WORK_DIR (default runs/real, git-ignored): the images are linked, never copied.
set -euo pipefail

DATA=${1:-/work/shared/data/cs4243-train}
WORK=${2:-runs/real}
EPOCHS1=${EPOCHS1:-0}
EPOCHS2=${EPOCHS2:-0}
READER_EPOCHS=${READER_EPOCHS:-20}
READER_BATCH=${READER_BATCH:-32}
READER_LR=${READER_LR:-2e-3}
BATCH=${BATCH:-16}
LR1=${LR1:-1e-3}
LR2=${LR2:-5e-4}
HOLDOUT=${HOLDOUT:-1000}
SEED=${SEED:-0}
CQ=${CQ:-captcha-queue}
AUGMENT=${AUGMENT:-1}
EMA=${EMA:-0.998}
SYNTH=${SYNTH:-0}
READER_CONFIG=${READER_CONFIG:-'{"reader_width": 128, "reader_crop": 32, "reader_resolution": "original"}'}
BOXES=${BOXES:-colour}
BOTH_GATE=${BOTH_GATE:-1}
SYNTH_SEED=${SYNTH_SEED:-5}
DEVICE=${DEVICE:-cpu}
WORKERS=${WORKERS:-1}
INIT=${INIT:-$(python -c "from core.checkpoint import default_checkpoint_path; print(default_checkpoint_path())")}

if [ "$INIT" = none ] && [ "$EPOCHS1" -eq 0 ]; then
    echo "INIT=none needs EPOCHS1 > 0 (a detector trained on the real images)" >&2; exit 2
fi

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

TRAIN_ARGS=(--seed "$SEED" --device "$DEVICE" --workers "$WORKERS")
if [ "$AUGMENT" = 1 ]; then TRAIN_ARGS+=(--augment); fi
if [ "$EMA" != 0 ]; then TRAIN_ARGS+=(--ema-decay "$EMA"); fi
INIT_ARGS=(); LABEL_ARGS=()
if [ "$INIT" != none ]; then INIT_ARGS=(--init-from "$INIT"); LABEL_ARGS=(--checkpoint "$INIT"); fi

stamp "autolabel by colour${LABEL_ARGS:+, then with $INIT}"
$CQ autolabel "$WORK/train" --out "$WORK/labels1" --render-dir "$WORK/render" --render 12 --device "$DEVICE" "${LABEL_ARGS[@]}"

FINAL="$INIT"
LABELS="$WORK/labels1"
if [ "$EPOCHS1" -gt 0 ]; then
    stamp "train round 1 ($EPOCHS1 epochs)"
    $CQ train --images "$WORK/train" --labels "$WORK/labels1" --out "$WORK/round1/fast.safetensors" \
        "${INIT_ARGS[@]}" --epochs "$EPOCHS1" --lr "$LR1" --batch-size "$BATCH" "${TRAIN_ARGS[@]}"
    FINAL="$WORK/round1/fast.safetensors"
fi
if [ "$EPOCHS1" -gt 0 ] && [ "$EPOCHS2" -gt 0 ]; then
    stamp "autolabel with the round-1 detector"
    $CQ autolabel "$WORK/train" --out "$WORK/labels2" --device "$DEVICE" --checkpoint "$WORK/round1/fast.safetensors"

    stamp "train round 2 ($EPOCHS2 epochs from round 1)"
    $CQ train --images "$WORK/train" --labels "$WORK/labels2" --out "$WORK/round2/fast.safetensors" \
        --init-from "$WORK/round1/fast.safetensors" --epochs "$EPOCHS2" --lr "$LR2" --batch-size "$BATCH" "${TRAIN_ARGS[@]}"
    FINAL="$WORK/round2/fast.safetensors"
    LABELS="$WORK/labels2"
fi

READER_DATA=(--images "$WORK/train" --labels "$LABELS")
if [ "$READER_EPOCHS" -gt 0 ] && [ "$SYNTH" -gt 0 ]; then
    stamp "synthesise $SYNTH images (seed $SYNTH_SEED) to mix with the labelled real ones"
    $CQ synth "$WORK/synth" --count "$SYNTH" --seed "$SYNTH_SEED" --quiet
    # validation stays real: the images train would hold out of the real set by itself (same seed, same share);
    # synthetic images are linked as <text>-s<n>, so that no name can meet a real one
    REAL=$(python - "$WORK" "$LABELS" "$SEED" <<'PY'
import os, sys
from core.formats import LabelledFolder
from core.train import TrainConfig, hold_out
work, labels, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
real = LabelledFolder(f"{work}/train", labels)
train, val = hold_out(real, TrainConfig(images=f"{work}/train", labels=labels, out="", seed=seed))
paths = real.paths  # a new list on every access: read it once
for part, subset in (("mix", train), ("mixval", val)):
    for sub in ("images", "labels"):
        os.makedirs(f"{work}/{part}/{sub}")
    for i in subset.indices:
        image = paths[i]
        os.symlink(image.resolve(), f"{work}/{part}/images/{image.name}")
        os.symlink(os.path.realpath(f"{labels}/{image.stem}.txt"), f"{work}/{part}/labels/{image.stem}.txt")
for name in sorted(os.listdir(f"{work}/synth/images")):
    stem = name.rsplit(".", 1)[0]
    text, n = stem.split("-", 1)
    os.symlink(os.path.realpath(f"{work}/synth/images/{name}"), f"{work}/mix/images/{text}-s{n}.png")
    os.symlink(os.path.realpath(f"{work}/synth/labels/{stem}.txt"), f"{work}/mix/labels/{text}-s{n}.txt")
print(len(train.indices))
PY
)
    stamp "mixed $REAL real and $SYNTH synthetic training images; epochs of $REAL samples"
    READER_DATA=(--images "$WORK/mix/images" --labels "$WORK/mix/labels" --val-images "$WORK/mixval/images"
                 --val-labels "$WORK/mixval/labels" --epoch-size "$REAL")
fi
if [ "$READER_EPOCHS" -gt 0 ]; then
    # the network from above (a glyph reader is added where it has none); only the reader and context head learn
    stamp "train the glyph reader ($READER_EPOCHS epochs from $FINAL, detector frozen)"
    $CQ train "${READER_DATA[@]}" --out "$WORK/reader/fast.safetensors" \
        --init-from "$FINAL" --model-config "$READER_CONFIG" --train-parts reader \
        --epochs "$READER_EPOCHS" --lr "$READER_LR" --batch-size "$READER_BATCH" "${TRAIN_ARGS[@]}"
    FINAL="$WORK/reader/fast.safetensors"
fi

stamp "eval $FINAL on the held-out split"
$CQ eval --images "$WORK/val" --checkpoint "$FINAL" --device "$DEVICE" --json | tee "$WORK/val.json"
if [ "$BOXES" != detector ]; then
    # the same weights reading the glyphs that colour segmentation finds (the boxes autolabel trained them on)
    SETTINGS="{\"box_source\": \"$BOXES\"}"
    if [ "$BOXES" = both ] && [ "$BOTH_GATE" != 1 ]; then
        SETTINGS="{\"box_source\": \"both\", \"both_gate\": $BOTH_GATE}"
    fi
    $CQ reconfigure "$FINAL" --set "$SETTINGS" --out "$WORK/$BOXES/fast.safetensors"
    FINAL="$WORK/$BOXES/fast.safetensors"
    stamp "eval $FINAL on the held-out split"
    $CQ eval --images "$WORK/val" --checkpoint "$FINAL" --device "$DEVICE" --json | tee "$WORK/val-$BOXES.json"
fi
stamp "done"
