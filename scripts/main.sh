#!/usr/bin/env bash
# The main job, on a fresh machine, CPU only: install; train the digits-diffenc-trainable preset (a trainable
# DiffEnc on scikit-learn's 8x8 digits) for a few minutes; then sample and evaluate the saved EMA pipeline.
#
#   bash scripts/main.sh
#
# Environment: PYTHON (default python3), OUT (default outputs/digits-diffenc-trainable), MAX_TRAIN_STEPS
# (default: the preset's 1000), OMP_NUM_THREADS (default 1). Running it again resumes the run from its latest
# checkpoint instead of starting over (a finished run is only evaluated again).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-outputs/digits-diffenc-trainable}
# The digits networks are tiny: one intra-op thread is about as fast as two, and does not collapse when other
# jobs share the cores (two threads then ran 6x slower here).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

bash scripts/setup.sh

steps=()
if [[ -n "${MAX_TRAIN_STEPS:-}" ]]; then
    steps=(--max_train_steps "$MAX_TRAIN_STEPS")
fi
started=$SECONDS
"$PYTHON" training/train_diffenc.py --preset digits-diffenc-trainable --output_dir "$OUT" \
    --resume_from_checkpoint latest "${steps[@]}"
trained=$SECONDS

# The installed console command `diffenc-evaluate` is the same program as this module.
"$PYTHON" -m diffenc_diffusers.evaluation --pipeline "$OUT" --dataset digits --num_timesteps 10 100 1000 \
    --repeats 3 --output_json "$OUT/evaluation/bpd.json" --sample_grid "$OUT/evaluation/samples.png" \
    --num_samples 64 --num_inference_steps 1000 --encoder_figure "$OUT/evaluation/encoder.png"

echo
echo "Training took $((trained - started)) s, evaluation $((SECONDS - trained)) s."
echo "Pipeline folder (EMA weights; DiffEncPipeline.from_pretrained): $OUT"
echo "Sample grid:    $OUT/evaluation/samples.png"
echo "bits/dim JSON:  $OUT/evaluation/bpd.json"
echo "Encoder figure: $OUT/evaluation/encoder.png"
echo "TensorBoard:    tensorboard --logdir $OUT/logs"
