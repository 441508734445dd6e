"""What the commands print and write: the Markdown tables, the CSV, strict JSON, and the error boundary that turns a
user's mistake into one message.

Every subcommand runs inside `run_command`: an error the user can fix (`UserError`, and the operating system's file
errors) is one line on stderr and exit code 2; `--debug` shows its traceback as well. Any other exception is a bug
and keeps its traceback."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

from saeforge.errors import UserError
from saeforge.evaluation.metrics import finite_ci, is_finite_number
from saeforge.files import write_atomic

# Loss-based metrics, in the order they lead the table and the CSV; each has a bootstrap CI (`<key>_ci`).
LOSS_COLUMNS = ["delta_ce", "kl_div", "loss_recovered_mean", "loss_recovered_zero", "l_added"]
# Scalar columns of the CSV, in order (the JSON rows hold these, the histograms and the per-context arrays); a CI
# [lo, hi] is written as <key>_ci_lo and <key>_ci_hi.
CSV_COLUMNS = [
    "name", "architecture", "variant", "model", "site", "d_in", "d_sae", "k", "sparsity_coeff", "target_l0", "ito_k",
    "l0", *[c for key in LOSS_COLUMNS for c in (key, f"{key}_ci_lo", f"{key}_ci_hi")],
    "ce_clean", "ce_spliced", "ce_zero_ablation", "ce_mean_ablation", "mse", "nmse", "fvu", "cosine", "gamma",
    "gamma_centered", "dead_fraction", "dense_fraction", "eval_contexts", "eval_tokens", "eval_excluded_positions",
    "max_input_norm", "path",
]
# (column, header, format) of the terminal table; a row's `<column>_ci` is shown in brackets after the value.
TABLE_COLUMNS = [
    ("l0", "L0", "{:.1f}"), ("delta_ce", "delta CE (nats)", "{:.4f}"), ("kl_div", "KL", "{:.4f}"),
    ("loss_recovered_mean", "loss rec. (mean)", "{:.2%}"), ("loss_recovered_zero", "loss rec. (zero)", "{:.2%}"),
    ("l_added", "L_added", "{:.2%}"), ("nmse", "NMSE", "{:.3f}"), ("fvu", "FVU", "{:.3f}"), ("cosine", "cos", "{:.3f}"),
    ("gamma", "gamma", "{:.3f}"), ("dead_fraction", "dead", "{:.1%}"), ("dense_fraction", "dense", "{:.1%}"),
]


def ci_cell(row: dict, key: str, fmt: str) -> str:
    """A table cell: the value, its interval in brackets when it has one, "-" when it has no finite value."""
    value, ci = row.get(key), finite_ci(row, key)
    if not is_finite_number(value):
        return "-"
    return fmt.format(value) + (f" [{fmt.format(ci[0])}, {fmt.format(ci[1])}]" if ci else "")


def markdown_table(rows: list[dict]) -> str:
    """A short Markdown table of the headline metrics, one line per SAE; CIs in brackets."""
    cols = [c for c in TABLE_COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| SAE | arch | " + " | ".join(h for _, h, _ in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = [ci_cell(r, key, fmt) for key, _, fmt in cols]
        lines.append(f"| {r['name']} | {r['architecture']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pca_table(reference: list[dict]) -> str:
    """The PCA reference as a Markdown table (the L0 column holds the rank)."""
    return markdown_table([{**r, "l0": r["rank"]} for r in reference])


def write_csv(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            flat = dict(r)
            for key in LOSS_COLUMNS:
                ci = r.get(f"{key}_ci")
                if isinstance(ci, (list, tuple)) and len(ci) == 2:
                    flat[f"{key}_ci_lo"], flat[f"{key}_ci_hi"] = ci
            writer.writerow({k: ("" if flat.get(k) is None else flat.get(k)) for k in CSV_COLUMNS})
    return path


def print_report(rows: list[dict], pca: list[dict], matched: list[dict]) -> None:
    """The terminal report of eval and sweep: the SAE table, the PCA reference, the matched-L0 lines."""
    print(markdown_table(rows))
    if pca:
        print(f"\nPCA reference (rank-k reconstruction spliced in; principal directions from {pca[0]['fit']}; "
              "L0 column = rank):")
        print(pca_table(pca))
    if any(r.get("delta_ce_ci") for r in rows):
        print("\n[lo, hi]: bootstrap confidence intervals over held-out contexts.")
    for m in matched:
        print(m["summary"])


def finite_or_null(value):
    """The payload with NaN and infinities as None, so the file is JSON that strict parsers read (a metric that
    could not be computed, e.g. gamma with no active latents, is null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def write_json(path: Path, payload: dict) -> Path:
    """Strict JSON (NaN as null), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(finite_or_null(payload), indent=1, allow_nan=False))
    return path


def run_command(name: str, run, debug: bool = False) -> None:
    """Call `run()`; an error the user can fix ends the process with one message and exit code 2.

    In a torchrun job of several processes every message names the rank that printed it, a bug's traceback is
    announced with its rank, and a rank that only lost its peers (torch.distributed's DistError, raised when another
    rank died during a collective; distributed.CollectiveError) says so, so the rank that failed first is the one whose
    message says why."""
    try:
        run()
    except (UserError, OSError, UnicodeDecodeError) as e:
        if debug:
            raise
        message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        print(f"saeforge {name}: error{_rank_label()}: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:
        label = _rank_label()
        if not label:
            raise
        if _lost_peers(e):
            print(f"saeforge {name}: stopped{label}: a collective with the other ranks failed, most likely because "
                  f"another rank stopped (its message says why): {e}", file=sys.stderr)
            if debug:
                raise
            raise SystemExit(1) from None
        print(f"saeforge {name}: error{label}: an unexpected {type(e).__name__} (traceback below)", file=sys.stderr)
        raise


def _rank_label() -> str:
    from saeforge.training.distributed import rank_label  # only when reporting an error

    return rank_label()


def _lost_peers(e: BaseException) -> bool:
    """Whether `e` says that a collective failed (a peer died, a connection closed)."""
    from saeforge.training.distributed import CollectiveError

    try:
        from torch.distributed import DistError
    except ImportError:
        return isinstance(e, CollectiveError)
    return isinstance(e, (CollectiveError, DistError))
