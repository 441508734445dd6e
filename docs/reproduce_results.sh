#!/usr/bin/env bash
# Remakes docs/results.md's runs on the embedded Gemma 3 270M: harvests (cached under runs/results/cache), then one
# `saeforge sweep` per results config, then the tables. Run from the repository root after `make install`.
# Measured on an Intel Xeon with native bf16 ("auto" picks bf16), one thread per job while other work shared the 2
# cores: activation harvests about 1 minute each, the harvest with gradients 33 (a backward pass through the 262k-
# vocabulary head per token); paper_a_resid 61 minutes (28 training, 33 evaluating 20 SAEs on 32k tokens), its
# ablations 34, paper_a_mlp 108 (41 + 67, with two jobs and helpers sharing the cores), paper_b 100 (38 training +
# 62 evaluating 23 SAEs on 16k tokens with steering). Under 6 hours in all, one job at a time; expect 2-3x that where
# "auto" picks float32 (CPUs without native bf16).
set -euo pipefail
SAEFORGE="${SAEFORGE:-.venv/bin/saeforge}"
PY="${PY:-.venv/bin/python}"
CACHE=runs/results/cache

harvest() {  # site, name[, --grad]: 262,144 training tokens and 16,384 held-out ones, once
    local site=$1 name=$2 grad=${3:-}
    [ -f "$CACHE/${name}_train/manifest.json" ] || "$SAEFORGE" harvest --model embedded --site "$site" \
        --source embedded --out "$CACHE/${name}_train" --tokens 262144 --dtype float32 --model-dtype auto $grad
    [ -f "$CACHE/${name}_eval/manifest.json" ] || "$SAEFORGE" harvest --model embedded --site "$site" \
        --source embedded --out "$CACHE/${name}_eval" --split eval --tokens 16384 --dtype float32 --model-dtype auto
}

harvest blocks.9.resid_post resid9
"$SAEFORGE" sweep configs/results/paper_a_resid.toml --overwrite            # Gated vs ReLU at L0 targets, 2-3 seeds
"$SAEFORGE" sweep configs/results/paper_a_resid_ablations.toml --overwrite  # untied, no r_mag, unfrozen aux, rescale & shift
harvest blocks.9.mlp_out mlp9
"$SAEFORGE" sweep configs/results/paper_a_mlp.toml --overwrite              # Gated vs ReLU at an MLP output
# Paper B: the gradients at the site are harvested with the activations.
harvest blocks.9.resid_post resid9_grad --grad
"$SAEFORGE" sweep configs/results/paper_b.toml --overwrite                  # g-SAE vs TopK, beta once, steering
"$PY" docs/results_tables.py > docs/results/tables.md
