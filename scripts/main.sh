#!/usr/bin/env bash
# The main job, on a fresh machine, CPU only: install; train a trainable DiffEnc preset for a few minutes (by
# default digits-diffenc-trainable, on scikit-learn's 8x8 digits); then sample and evaluate the EMA pipeline.
#
#   bash scripts/main.sh                     # digits: about 10 minutes on 2 CPU cores
#   DATASET=mnist5k bash scripts/main.sh     # mnist5k-diffenc-trainable on 5,000 real 28x28 MNIST images
#
# Environment: DATASET (digits or mnist5k, the built-in data and the preset family; default digits), PYTHON
# (default python3), OUT (default outputs/<DATASET>-diffenc-trainable), MAX_TRAIN_STEPS (default: the preset's,
# 1000 for digits, 600 for mnist5k), OMP_NUM_THREADS (default 1). Running it again resumes the run from its
# latest checkpoint instead of starting over (a finished run is only evaluated again).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DATASET=${DATASET:-digits}
case "$DATASET" in
    digits) sampling_steps=1000 ;;
    # 28x28 sampling costs 12x as much per step as 8x8: 200 ancestral steps keep the evaluation to minutes.
    mnist5k) sampling_steps=200 ;;
    *) echo "DATASET must be digits or mnist5k, got '$DATASET'." >&2; exit 2 ;;
esac
PRESET=$DATASET-diffenc-trainable
OUT=${OUT:-outputs/$PRESET}
# The digits networks are tiny: one intra-op thread is about as fast as two, and does not collapse when other
# jobs share the cores (two threads then ran 6x slower here).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

bash scripts/setup.sh

steps=()
if [[ -n "${MAX_TRAIN_STEPS:-}" ]]; then
    steps=(--max_train_steps "$MAX_TRAIN_STEPS")
fi
started=$SECONDS
"$PYTHON" training/train_diffenc.py --preset "$PRESET" --output_dir "$OUT" \
    --resume_from_checkpoint latest "${steps[@]}"
trained=$SECONDS

# The installed console command `diffenc-evaluate` is the same program as this module.
"$PYTHON" -m diffenc_diffusers.evaluation --pipeline "$OUT" --dataset "$DATASET" --num_timesteps 10 100 1000 \
    --repeats 3 --output_json "$OUT/evaluation/bpd.json" --sample_grid "$OUT/evaluation/samples.png" \
    --num_samples 64 --num_inference_steps "$sampling_steps" --encoder_figure "$OUT/evaluation/encoder.png"

echo
echo "Training took $((trained - started)) s, evaluation $((SECONDS - trained)) s."
echo "Pipeline folder (EMA weights; DiffEncPipeline.from_pretrained): $OUT"
echo "Sample grid:    $OUT/evaluation/samples.png"
echo "bits/dim JSON:  $OUT/evaluation/bpd.json"
echo "Encoder figure: $OUT/evaluation/encoder.png"
echo "TensorBoard:    tensorboard --logdir $OUT/logs"
