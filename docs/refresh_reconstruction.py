"""Recompute the reconstruction-only metrics of a finished sweep (no LM splicing), and redraw its figures.

    python docs/refresh_reconstruction.py configs/results/paper_a_resid.toml

Adds `gamma_centered` and `variant` to rows of sweeps evaluated before those existed, on the same held-out
contexts, and checks that the recomputed FVU matches the stored one. Much cheaper than `sweep --no-train`: one
forward pass truncated at the site, instead of a full forward pass per SAE and batch.
"""

import json
import math
import sys
from pathlib import Path

import torch

from saeforge.config import load_config
from saeforge.evaluation.commands import eval_contexts, write_csv
from saeforge.evaluation.metrics import ReconstructionStats
from saeforge.evaluation.splice import splice_mask
from saeforge.models import load_lm
from saeforge.saes import load_sae
from saeforge.viz.pareto import pareto_figures

cfg = load_config(sys.argv[1])
out = Path(cfg.eval.out_dir)
payload = json.loads((out / "sweep.json").read_text())
rows = payload["results"]
lm = load_lm(cfg.model)
site = cfg.model.site
contexts = eval_contexts(lm, cfg.data, cfg.eval.tokens, cfg.eval.batch_size)
saes = [load_sae(r["path"]) for r in rows]
stats = [ReconstructionStats() for _ in rows]
with torch.no_grad():
    for tokens in contexts.split(cfg.eval.batch_size):
        x = lm.capture(tokens, [site])[site][splice_mask(lm, tokens, cfg.data.keep_bos)].float()
        for sae, st in zip(saes, stats):
            st.update(x, sae.decode(sae.encode(x)), center=sae.b_dec.float())
for row, sae, st in zip(rows, saes, stats):
    res = st.result()
    assert math.isclose(res["fvu"], row["fvu"], rel_tol=1e-3), (row["name"], res["fvu"], row["fvu"])
    row["gamma_centered"] = res["gamma_centered"]
    row["variant"] = sae.variant()
(out / "sweep.json").write_text(json.dumps(payload, indent=1))
write_csv(rows, out / "sweep.csv")
pareto_figures(rows, out, lm.name, site)
print(f"refreshed {len(rows)} rows in {out}")
