#!/usr/bin/env bash
# The GPU check (issue 16), at most about 8 minutes on one CUDA GPU:
#   (a) each model kind (digits presets: VDM, non-trainable and trainable DiffEnc, class-conditional trainable) trained
#       for a few hundred steps in bf16 through `accelerate launch training/train_diffenc.py`, then evaluated with
#       `python -m diffenc_diffusers.evaluation` and a sample grid: exit codes, pipeline saved, bits/dim;
#   (b) CPU against CUDA on the same weights, inputs and noise (fp32, TF32 off): objective terms, bits/dim, a sampling
#       step (scripts/gpu_check_compare.py; relative difference <= 1e-4);
#   (c) the paper-size benchmarks (benchmarks/gpu_explore.py): training step of VDM and trainable DiffEnc in bf16 and
#       fp32 with the speed options, bare bf16 denoiser forward against a sampling step (and the 1000-step sampling time
#       of 128 images), bits/dim throughput; images/s, TFLOP/s, fraction of the bf16 peak, peak memory. The compiling
#       variants come last.
# Every command runs under its own `timeout`, and no section starts past the total budget, so a slow one cannot starve
# the rest. The tables go to OUT_DIR as they are made: summary.md (all tables), gpu_check.log (everything printed),
# train_eval.json, compare.json, gpu_explore.json/.md and one sample grid: at most 7 files. Runs and pipelines go to a
# temporary folder.
#
#   bash scripts/gpu_check.sh [OUT_DIR]             # OUT_DIR: default $OUT if set, else ./gpu_check_out
#   bash scripts/gpu_check.sh --dry-run [OUT_DIR]   # CPU, tiny sizes, a few steps (tests/test_gpu_check.py runs it)
#
# Environment: run from anywhere; the repository root is put first on PYTHONPATH (the package need not be installed,
# and diffusers may come from PYTHONPATH too). PYTHON (default python3), GPU_CHECK_SECONDS (total budget, default 450),
# GPU_CHECK_STEPS (training steps per kind, default 200).
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

dry=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry=1
    shift
fi
out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PYTHON="${PYTHON:-python3}"
summary="$out/summary.md"
exec > >(tee -a "$out/gpu_check.log") 2>&1

start=$(date +%s)
if ((dry)); then
    budget="${GPU_CHECK_SECONDS:-300}"
    steps="${GPU_CHECK_STEPS:-3}"
    presets=(digits-diffenc-trainable-classcond)
    device_args=(--cpu)
    launch=(--cpu --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no)
    eval_device=cpu
    images=32
    sampling_steps=4
    explore=(--dry-run --variants vdm/bf16 trainable/bf16 step/bf16w likelihood/bf16w)
else
    budget="${GPU_CHECK_SECONDS:-450}"
    steps="${GPU_CHECK_STEPS:-200}"
    presets=(digits-vdm digits-diffenc-nontrainable digits-diffenc-trainable digits-diffenc-trainable-classcond)
    device_args=()
    launch=(--num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no)
    eval_device=cuda
    images=256
    sampling_steps=100
    explore=(--variants
        vdm/bf16 trainable/bf16 trainable/bf16+tangent=autograd forward/bf16w step/bf16w
        vdm/fp32+tf32 trainable/fp32+tf32 vdm/fp32 trainable/fp32
        trainable/bf16+ckpt vdm/bf16+ckpt likelihood/bf16w likelihood/fp32 forward/autocast vdm/bf16+fusedadam
        vdm/bf16+cunet trainable/bf16+cunet+cenc step/bf16w+cunet forward/bf16w+cunet trainable/bf16+ckpt+cunet+cenc)
fi

left() { echo $((budget - ($(date +%s) - start))); }

# run NAME LIMIT COMMAND...: COMMAND under `timeout` (LIMIT, or what is left of the budget); prints and returns its rc.
run() {
    local name="$1" limit="$2"
    shift 2
    local remaining
    remaining=$(left)
    ((remaining < limit)) && limit=$remaining
    if ((limit < 5)); then
        echo "== $name: skipped (budget of ${budget} s spent)"
        return 124
    fi
    echo "== $name (limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - start)) s in all"
    return $rc
}

{
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ)$( ((dry)) && echo ' (dry run: CPU, tiny sizes)')"
    echo
    "$PYTHON" - <<'EOF'
import platform

import torch

gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: {gpu}")
EOF
    echo
} >>"$summary"

# (a) train each kind through accelerate launch, then evaluate the saved pipeline with a sample grid.
echo -e "## (a) Training ${steps} steps in bf16 through accelerate launch, then diffenc-evaluate\n" >>"$summary"
echo "| preset | train exit | pipeline saved | train s | evaluate exit | test bits/dim | sample grid |" >>"$summary"
echo "|---|---|---|---|---|---|---|" >>"$summary"
for preset in "${presets[@]}"; do
    dir="$work/$preset"
    began=$(date +%s)
    run "train $preset" 90 "$PYTHON" -m accelerate.commands.launch "${launch[@]}" training/train_diffenc.py \
        --preset "$preset" --max_train_steps "$steps" --mixed_precision bf16 --output_dir "$dir" "${device_args[@]}" \
        --checkpointing_steps 100000 --validation_steps 0 --num_validation_images 16 \
        --num_inference_steps "$sampling_steps" --final_eval_num_images "$images" --report_to none
    train_rc=$?
    seconds=$(($(date +%s) - began))
    saved=no
    [[ -f "$dir/model_index.json" ]] && saved=yes
    eval_rc=skipped
    bpd=-
    grid=-
    if [[ $saved == yes ]]; then
        run "evaluate $preset" 60 "$PYTHON" -m diffenc_diffusers.evaluation --pipeline "$dir" --dataset digits \
            --num_images "$images" --batch_size 256 --t_grid_points 4 --t_grid_num_images 32 \
            --output_json "$work/$preset.json" --sample_grid "$work/$preset.png" --num_samples 16 \
            --num_inference_steps "$sampling_steps" --device "$eval_device"
        eval_rc=$?
        bpd=$("$PYTHON" -c "import json, sys; print(f\"{json.load(open(sys.argv[1]))['continuous']['bpd']:.4f}\")" \
            "$work/$preset.json" 2>/dev/null)
        if [[ -f "$work/$preset.png" ]]; then
            grid=yes
            [[ $preset == digits-diffenc-trainable ]] && cp "$work/$preset.png" "$out/sample_grid_$preset.png"
        fi
    fi
    row=("$preset" "$train_rc" "$saved" "$seconds" "$eval_rc" "${bpd:--}" "$grid")
    (
        IFS='|'
        echo "|${row[*]}|"
    ) >>"$summary"
    (
        IFS=$'\t'
        echo "${row[*]}"
    ) >>"$work/train_eval.tsv"
done
"$PYTHON" - "$work/train_eval.tsv" "$out/train_eval.json" <<'EOF'
import json
import sys

keys = ["preset", "train_exit", "pipeline_saved", "train_seconds", "evaluate_exit", "test_bpd", "sample_grid"]
rows = [dict(zip(keys, line.rstrip("\n").split("\t"), strict=True)) for line in open(sys.argv[1]) if line.strip()]
open(sys.argv[2], "w").write(json.dumps(rows, indent=1) + "\n")
EOF
echo >>"$summary"

# (b) CPU against CUDA.
echo -e "## (b) CPU against CUDA, same weights, inputs and noise (fp32, TF32 off)\n" >>"$summary"
compare_args=(--json "$out/compare.json")
((dry)) && compare_args+=(--dry-run)
run "compare" 90 "$PYTHON" scripts/gpu_check_compare.py "${compare_args[@]}" | tee "$work/compare.txt"
compare_rc=${PIPESTATUS[0]}
grep '^|' "$work/compare.txt" >>"$summary"
echo -e "\nexit $compare_rc (0: every quantity within tolerance)\n" >>"$summary"

# (c) the paper-size benchmarks, compiling variants last; the explore script stops starting variants at its cap.
echo -e "## (c) Paper-size benchmarks (benchmarks/gpu_explore.py)\n" >>"$summary"
remaining=$(left)
cap=$((remaining - 25))
((cap < 10)) && cap=10
run "benchmarks" "$remaining" "$PYTHON" benchmarks/gpu_explore.py --out-dir "$out" --total-seconds "$cap" "${explore[@]}"
explore_rc=$?
if [[ -f "$out/gpu_explore.md" ]]; then
    cat "$out/gpu_explore.md" >>"$summary"
    "$PYTHON" - "$out/gpu_explore.json" >>"$summary" <<'EOF'
import json
import sys

payload = json.load(open(sys.argv[1]))
flops = ", ".join(f"{kind} {value / payload['environment']['batch_size'] / 1e9:.1f}" for kind, value in payload["flops_per_step"].items())
print(f"\nGFLOP per image: {flops}; measured bf16 matmul peak {payload['bf16_matmul_tflops']:.0f} TFLOP/s")
for record in payload["records"]:
    if "sampling_1000_steps_s" in record:
        print(f"1000-step ancestral sampling of {payload['environment']['batch_size']} images ({record['variant']}): "
              f"{record['sampling_1000_steps_s']:.1f} s (1000 x the measured step)")
EOF
fi
echo -e "\nexit $explore_rc\n\nTotal: $(($(date +%s) - start)) s" >>"$summary"
echo
cat "$summary"
rm -rf "$work"
