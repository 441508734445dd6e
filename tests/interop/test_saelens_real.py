"""saeforge <-> SAELens against the real sae-lens package: runs where `import sae_lens` works (skipped elsewhere,
as in saeforge's own environment, which does not install it).

    PYTHONPATH=src benchmarks/.venv-peers/bin/python -m pytest tests/interop/test_saelens_real.py

The checks are benchmarks/interop_check.py's (which prints the same as JSON at a larger size): every exportable
saeforge architecture, saved by saeforge and exported by export_saelens, loads with SAELens's SAE.load_from_disk
with the same features and reconstructions (1e-5 relative) on inputs with norms 50..6000; what SAELens cannot hold is
refused by saeforge and not loaded by SAELens; SAEs that SAELens itself builds and saves (standard, gated, topk with
and without rescale_acts_by_decoder_norm, jumprelu, batchtopk for inference and as a training checkpoint,
apply_b_dec_to_input = False, expected_average_only_in with its scaler file) load with saeforge.load_sae with the
same features; per-token normalisations are refused.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("sae_lens")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "interop_check.py"


def _checks():
    spec = importlib.util.spec_from_file_location("interop_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result():
    return _checks().run_checks(d_in=64, d_sae=256, tokens=512, seed=1)


@pytest.mark.parametrize("part", ["to_saelens", "refused", "from_saelens"])
def test_real_saelens(result, part):
    failed = [row for row in result[part] if not row["ok"]]
    assert not failed, json.dumps(failed, indent=2)


def test_tied_gated_differences_are_rounding_of_the_order_of_operations(result):
    r = result["gated_rounding"]
    # computed in SAELens's order (x @ (W_enc * exp(r_mag))) saeforge's float32 features equal SAELens's exactly,
    # and the differences in saeforge's order stay within float32 rounding of the product
    assert r["max_abs_saeforge_in_saelens_order_vs_saelens"] == 0.0
    assert r["gate_decisions_differ"] == 0 and r["max_diff_over_rounding_scale"] <= 4.0
