"""An architecture added in one file (here: this test module, not the package) trains, sweeps, evaluates, saves and
loads without any other file knowing its name: everything the library asks about it is declared on its class."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import Tensor, nn

from saeforge.commands.sweep import sweep_command
from saeforge.saes import REGISTRY, SAE, SAELoss, load_sae
from saeforge.saes.base import encoder_pre_acts, register, squared_error


class ReluTopK(SAE):
    """Test-only: the k largest of ReLU(W_enc (x - b_dec) + b_enc), trained on reconstruction alone (autograd)."""

    sparsity = "k"
    dead_latents = "none"
    adam_betas = (0.9, 0.999)
    option_names = ("k",)

    def __init__(self, d_in: int, d_sae: int, *, k: int = 4, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(d_in, d_sae, dtype=dtype, device=device)
        self.k = int(k)
        self.W_enc = nn.Parameter(self.W_dec.detach().T.clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device))

    def encode(self, x: Tensor, grad: Tensor | None = None) -> Tensor:
        self.check_input(x)
        pre = torch.relu(encoder_pre_acts(x, self.W_enc, self.b_enc, self.b_dec))
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values)

    def loss(self, x, sparsity_coeff=None, grad=None, dead_mask=None) -> SAELoss:
        f = self.encode(x)
        x_hat = self.decode(f)
        recon = squared_error(x, x_hat)
        zero = torch.zeros_like(recon)
        return SAELoss(recon, recon, zero, zero, f, x_hat)

    def latent_params(self) -> dict[str, int]:
        return {"W_enc": 1, "b_enc": 0, "W_dec": 0}

    def saelens_fields(self) -> dict:
        return {"k": self.k}


@pytest.fixture
def relu_topk():
    register("relu_topk_test")(ReluTopK)
    yield "relu_topk_test"
    REGISTRY.pop("relu_topk_test")


def test_an_architecture_declared_in_one_place_runs_end_to_end(tmp_path, sweep_config, relu_topk):
    config = sweep_config(f'pca_ranks = [4]\ngrid_architectures = ["{relu_topk}", "relu"]\ngrid_k = [2, 6]\n'
                          'grid_sparsity_coeffs = [1e-2]')
    out = tmp_path / "out"
    sweep_command(config, out=out, progress=False)
    with open(out / "sweep.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["architecture"] == relu_topk]
    assert sorted(int(r["k"]) for r in rows) == [2, 6]
    for r in rows:
        assert 0 < float(r["l0"]) <= int(r["k"]) + 1e-9  # its sparsity setting (k) was passed to it
        assert float(r["delta_ce_ci_lo"]) <= float(r["delta_ce"]) <= float(r["delta_ce_ci_hi"])
    report = json.loads((out / "sweep.json").read_text())
    assert {r["variant"] for r in report["results"]} == {relu_topk, "relu"}
    # Saved and loaded back through the registry.
    run_dir = tmp_path / "run" / f"{relu_topk}_w128_k2"
    sae = load_sae(run_dir)
    assert isinstance(sae, ReluTopK) and sae.k == 2 and sae.architecture == relu_topk
    x = torch.randn(5, sae.d_in)
    assert torch.equal(sae.encode(x), load_sae(run_dir).encode(x))
    assert (sae.encode(x) > 0).sum(-1).max() <= 2
    cfg = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert any(s["architecture"] == relu_topk for s in cfg["sae"])
