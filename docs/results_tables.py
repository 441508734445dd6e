"""Print the Markdown tables of docs/results.md from the sweep outputs under docs/results/*/sweep.json.

    python docs/results_tables.py > /tmp/tables.md
"""

import json
import math
from pathlib import Path

ROOT = Path(__file__).parent / "results"
COLUMNS = [("name", "SAE", "{}"), ("d_sae", "latents", "{}"), ("setting", "lambda / k", "{}"), ("l0", "L0", "{:.1f}"),
           ("loss_recovered_zero", "LR (zero)", "{:.3f}"), ("loss_recovered_mean", "LR (mean)", "{:.3f}"),
           ("kl_div", "KL", "{:.3f}"), ("l_added", "L_added", "{:.3f}"), ("nmse", "NMSE", "{:.3f}"),
           ("fvu", "FVU", "{:.3f}"), ("gamma", "gamma", "{:.3f}"), ("gamma_centered", "gamma (centred)", "{:.3f}"), ("dead_fraction", "dead", "{:.3f}"),
           ("dense_fraction", "dense", "{:.3f}")]


def cell(row, key, fmt):
    if key == "setting":
        return f"k={row['k']}" if row.get("k") else f"{row.get('sparsity_coeff'):g}"
    v = row.get(key)
    if isinstance(v, float) and not math.isfinite(v):
        return "-"
    return fmt.format(v) if v is not None else "-"


def table(rows, columns=COLUMNS):
    out = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(cell(r, k, f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join(out)


def paper_b_extras(rows):
    cols = ["| SAE | decoder max-cos (mean) | abs dir. derivative: decoder / random / cov.-matched | steering on-target | "
            "steering off-target added |", "|---|---|---|---|---|"]
    for r in rows:
        dd = r.get("directional_derivative") or {}
        st = r.get("steering") or {}
        mc = (r.get("decoder_max_cos") or {}).get("mean")

        def m(v):
            return f"{v:.3g}" if isinstance(v, (int, float)) else "-"

        def f(v):
            return f"{v:.4f}" if isinstance(v, (int, float)) else "-"
        cols.append(f"| {r['name']} | {f(mc)} | {m(dd.get('decoder'))} / {m(dd.get('random'))} / "
                    f"{m(dd.get('covariance_matched'))} | {f(st.get('mean_on_target'))} | "
                    f"{f(st.get('mean_off_target_added'))} |")
    return "\n".join(cols)


for run in ("paper_a_resid", "paper_a_rescale_shift", "paper_a_mlp", "paper_b"):
    path = ROOT / run / "sweep.json"
    if not path.exists():
        print(f"### {run}: not run\n")
        continue
    rows = json.loads(path.read_text())["results"]
    r0 = rows[0]
    print(f"### {run}: {r0['model']} @ {r0['site']}, {r0['eval_tokens']:,} held-out tokens, "
          f"clean CE {r0['ce_clean']:.3f}, zero-ablation CE {r0.get('ce_zero_ablation', float('nan')):.3f}, "
          f"mean-ablation CE {r0.get('ce_mean_ablation', float('nan')):.3f}\n")
    print(table(rows) + "\n")
    if run == "paper_b":
        print(paper_b_extras(rows) + "\n")
