#!/usr/bin/env bash
# Run every benchmark of one machine class and keep the tables (.md) and numbers (.json) in one folder.
#
#   bash benchmarks/run.sh cpu   [OUT]   # this repository's CPU tables (about 50 min on 2 cores)
#   bash benchmarks/run.sh gpu   [OUT]   # the paper's CIFAR-10 sizes on one CUDA GPU, fp32 and bf16 (about 10 min)
#   bash benchmarks/run.sh smoke [OUT]   # every script once on tiny models (a minute; checks that they run)
#
# OUT defaults to benchmarks/results/<mode>. Each table is printed and also written to OUT/<name>.md.
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-}"
out="${2:-benchmarks/results/$mode}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"

run() {
    local name="$1"
    shift
    echo "== $name: python benchmarks/$*"
    "$PYTHON" "benchmarks/$@" --json "$out/$name.json" | tee "$out/$name.md"
}

case "$mode" in
    cpu)
        mkdir -p "$out"
        cpu=(--threads 1 --clock cpu)
        run training_fp32 bench_training.py --preset cpu "${cpu[@]}" --dtype fp32 --repeats 21
        # The same with glibc's allocator keeping freed memory (no page faults on every large tensor), the effect
        # of the jemalloc/tcmalloc advice of PyTorch's CPU performance guide.
        MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1000000000000000 \
            run training_fp32_malloc_kept bench_training.py --preset cpu "${cpu[@]}" --dtype fp32 --repeats 21 \
            --no-memory
        run training_paper_sizes bench_training.py --preset cifar10 --batch-size 2 "${cpu[@]}" --dtype fp32 \
            --repeats 7 --no-memory
        run training_bf16 bench_training.py --preset cpu "${cpu[@]}" --kinds none trainable --dtype fp32 bf16 \
            --repeats 2 --no-memory
        run training_compile bench_training.py --preset cpu "${cpu[@]}" --kinds none trainable --dtype fp32 \
            --compile off on --repeats 7 --no-memory --no-bpd-check
        run sampling bench_sampling.py --preset cpu "${cpu[@]}" --num-inference-steps 10 --repeats 15
        run likelihood bench_likelihood.py --preset cpu "${cpu[@]}" --repeats 5
        run bf16_training bench_bf16_training.py --presets digits-vdm digits-diffenc-trainable --steps 200 \
            --output-dir "$(mktemp -d)"
        ;;
    gpu)
        mkdir -p "$out"
        gpu=(--preset cifar10 --device cuda)
        run training bench_training.py "${gpu[@]}" --dtype fp32 bf16 --compile off on --repeats 10
        run sampling bench_sampling.py "${gpu[@]}" --dtype fp32 bf16 --num-inference-steps 50 --repeats 5
        run likelihood bench_likelihood.py "${gpu[@]}" --dtype fp32 bf16 --num-images 1024 --repeats 3
        ;;
    smoke)
        mkdir -p "$out"
        tiny=(--preset tiny --threads 1 --repeats 1 --warmup 0)
        run training bench_training.py "${tiny[@]}" --dtype fp32 bf16
        run sampling bench_sampling.py "${tiny[@]}" --num-inference-steps 2
        run likelihood bench_likelihood.py "${tiny[@]}" --num-images 4
        ;;
    *)
        echo "usage: bash benchmarks/run.sh cpu|gpu|smoke [OUT]" >&2
        exit 2
        ;;
esac
