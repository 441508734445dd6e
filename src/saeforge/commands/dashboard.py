"""`saeforge dashboard`: a static HTML feature dashboard of one saved SAE (evaluation.latent_examples collects,
viz.dashboard draws).

Output: OUT/index.html (every latent, a filter box and sort order, dead latents apart), OUT/latents/N.html (one
self-contained page per latent) and OUT/examples/ (the collected examples as safetensors + JSON, to draw the pages
again without the LM: `LatentExamples.load` then `viz.dashboard.write_dashboard`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Optional

from tyro.conf import Positional

from saeforge.commands.evaluate import check_widths, load_for_command
from saeforge.config import ConfigError, DataConfig
from saeforge.data import eval_contexts
from saeforge.evaluation.latent_examples import collect_latent_examples
from saeforge.files import check_writable_dir
from saeforge.models import load_lm, site_width_before_loading
from saeforge.viz.dashboard import write_dashboard


def dashboard_command(
    sae_dir: Positional[Path],
    out: Path = Path("dashboard"),
    tokens: int = 50_000,
    model: Optional[str] = None,
    site: Optional[str] = None,
    source: str = "embedded",
    context_len: Optional[int] = None,
    top_n: int = 20,
    n_bands: int = 4,
    band_size: int = 5,
    latents: tuple[int, ...] = (),
    batch_size: int = 16,
    device: str = "cpu",
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    keep_bos: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> None:
    """Collect each latent's examples on held-out text in one pass and write a static HTML dashboard.

    Args:
        sae_dir: a saved SAE directory (cfg.json + sae_weights.safetensors).
        out: output directory (index.html, latents/N.html, examples/).
        tokens: held-out tokens to run over (whole contexts).
        model: the language model (else the SAE's cfg.json model_name).
        site: the site (else the SAE's cfg.json hook_name).
        source: text source of the held-out split ("embedded", a .txt/.jsonl/.parquet path, "hf:<id>").
        context_len: context length (else the SAE's context_size, else 128).
        top_n: top-activating contexts kept per latent.
        n_bands: bands of each latent's activation range to sample contexts from.
        band_size: contexts sampled per band.
        latents: write pages for these latents only (default: every live latent); the index lists all.
        batch_size: contexts per LM forward pass.
        device: where the LM and the SAE run.
        dtype: the LM's dtype ("auto": bf16 where this hardware runs it fast, else float32).
        keep_bos: also count BOS positions (use when the SAE was trained with keep_bos).
        seed: seed of the band samples.
        progress: show a progress bar.
    """

    # Everything that can be checked without the language model is checked before it loads.
    for flag, value in (("--tokens", tokens), ("--top-n", top_n), ("--n-bands", n_bands),
                        ("--band-size", band_size), ("--batch-size", batch_size)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    sae, model_name, site_name, ctx = load_for_command(sae_dir, model, site, context_len)
    data_cfg = DataConfig(source=source, context_len=ctx)
    wrong = [i for i in latents if not 0 <= i < sae.d_sae]
    if wrong:
        raise ConfigError(f"--latents: {wrong} out of range; {sae_dir} has latents 0..{sae.d_sae - 1}")
    check_writable_dir(out, "--out")
    check_widths([(sae_dir, sae.d_in)], site_name, model_name, site_width_before_loading(model_name, site_name))

    lm = load_lm(model_name, device=device, dtype=dtype)
    print(f"language model: {lm.precision.describe()}", file=sys.stderr)
    check_widths([(sae_dir, sae.d_in)], site_name, lm.name, lm.site_dim(site_name))
    contexts = eval_contexts(lm, data_cfg, tokens, batch_size)
    examples = collect_latent_examples(lm, sae, contexts, site=site_name, top_n=top_n, n_bands=n_bands,
                                       band_size=band_size, batch_size=batch_size, keep_bos=keep_bos, seed=seed,
                                       name=sae_dir.name, progress=progress)
    examples.info["sae"]["path"] = str(sae_dir)
    examples.save(out / "examples")
    index = write_dashboard(examples, out, latents or None)
    dead = len(examples.dead())
    print(f"{examples.d_sae - dead} live and {dead} dead latents over {examples.info['n_tokens']:,} held-out tokens")
    print(f"dashboard: {index}")
