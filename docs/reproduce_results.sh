#!/usr/bin/env bash
# Reproduces docs/results.md on the embedded Gemma 3 270M (CPU; about an hour on 2 cores).
# Run from the repository root after `make install` (or `make test`/`make demo`).
set -euo pipefail
SAEFORGE="${SAEFORGE:-.venv/bin/saeforge}"
"$SAEFORGE" sweep configs/results/paper_a_resid.toml --overwrite          # Gated vs ReLU + Gated ablations
"$SAEFORGE" sweep configs/results/paper_a_rescale_shift.toml --overwrite  # baseline + rescale & shift
"$SAEFORGE" sweep configs/results/paper_b.toml --overwrite                # g-SAE vs TopK, beta sweep
"$SAEFORGE" sweep configs/results/paper_a_mlp.toml --overwrite            # Gated vs ReLU at an MLP output
