#!/usr/bin/env bash
# The issue-16 comparison on CIFAR-10 on a CPU: every (optimizer, seed) pair as its own
# one-thread process, WORKERS at a time (longest first), then one merged table and plot.
#   bash benchmarks/cifar_comparison.sh OUT_DIR [optimizer:seed ...]
# Without pairs: the nine methods of the vSAM paper's table x seeds 0,1,2.
# Pairs already done (OUT_DIR/<optimizer>-s<seed>/results.json) are not run again, so an
# interrupted run resumes. Env: WORKERS (default 2), EXTRA (more train options).
set -euo pipefail
out=${1:?usage: cifar_comparison.sh OUT_DIR [optimizer:seed ...]}; shift
workers=${WORKERS:-2}
settings=(--dataset cifar10 --model wrn10_1 --epochs 30 --train-size 2000 --val-size 1000
          --no-augment --threads 1 --no-progress)
if [ $# -eq 0 ]; then
    # longest first: mean CPU s per run measured 2026-12-07 (RESULTS.md): sam 387, esam 343,
    # aesam 283, mesa 251, vsam 218, sam5 215, looksam 197, saf 174, sgd 163
    set -- $(for opt in sam esam aesam mesa vsam sam5 looksam saf sgd; do
                 for seed in 0 1 2; do echo "$opt:$seed"; done; done)
fi
mkdir -p "$out"
for pair in "$@"; do
    opt=${pair%%:*}; seed=${pair##*:}; dir="$out/$opt-s$seed"
    [ -f "$dir/results.json" ] && continue
    echo "python -m vsam_ext.train ${settings[*]} ${EXTRA:-} --optimizers $opt --seeds $seed --out-dir $dir > $dir.log 2>&1"
done | xargs -P "$workers" -I{} sh -c '{}'
dirs=$(ls -d "$out"/*-s*/ | sed 's:/$::' | paste -sd, -)
python -m vsam_ext.train --merge "$dirs" --out-dir "$out/merged" --no-progress
