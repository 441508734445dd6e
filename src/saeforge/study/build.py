"""Making a study: paper A's sampling of latents, their blind dashboards, the study file.

Paper A §4.3 sampled latents uniformly among those that fire (dead latents have nothing to show). Here "fire" is
measured on the held-out text the dashboards are drawn from: one pass of the LM and each SAE collects every latent's
examples and firing count (evaluation.latent_examples), then `latents_per_sae` of the latents with a non-zero count
are drawn without replacement, seeded, and each gets its dashboard page with nothing that identifies the SAE
(viz.dashboard.latent_page with blind=True).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np

from saeforge.config import DataConfig
from saeforge.data import eval_contexts
from saeforge.evaluation.latent_examples import collect_latent_examples
from saeforge.models import load_lm
from saeforge.saes import load_sae
from saeforge.study.db import StudyError, StudyItem, StudySAE, create_study
from saeforge.viz.dashboard import latent_page


def sample_live_latents(firing_counts: Sequence[int], n: int, rng: np.random.Generator, what: str) -> list[int]:
    """`n` latents drawn uniformly without replacement among those with a non-zero firing count, ascending."""
    live = np.flatnonzero(np.asarray(firing_counts) > 0)
    if live.size < n:
        raise StudyError(f"{what}: only {live.size} latents fire on the held-out text, fewer than the {n} asked for "
                         "(--latents-per-sae), or give more --tokens")
    return sorted(rng.choice(live, size=n, replace=False).tolist())


def _arms(sae_dirs: list[Path], arms: Sequence[str]) -> list[str]:
    """Each SAE's arm: as given, or for two SAEs their directory names (told apart if they are the same)."""
    if arms:
        if len(arms) != len(sae_dirs):
            raise StudyError(f"{len(arms)} --arm names for {len(sae_dirs)} --sae directories: give one per SAE")
        return list(arms)
    if len(sae_dirs) != 2:
        raise StudyError(f"{len(sae_dirs)} SAEs: a study compares two arms; with more than two SAEs (e.g. one pair "
                         "per site) name each one's arm with --arm")
    names = [d.resolve().name for d in sae_dirs]
    return names if names[0] != names[1] else [f"A ({names[0]})", f"B ({names[1]})"]


def build_study(path: Path, sae_dirs: Sequence[Path], *, arms: Sequence[str] = (), latents_per_sae: int = 10,
                seed: int = 0, raters: Sequence[str] = (), tokens: int = 65536, source: str = "embedded",
                context_len: Optional[int] = None, batch_size: int = 8, top_n: int = 20, device: str = "cpu",
                dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto", model: Optional[str] = None,
                progress: bool = True) -> Path:
    """Sample `latents_per_sae` live latents of each SAE, draw their blind dashboards from `tokens` held-out tokens
    of `source`, and write the study file `path` with `raters` registered. Arms: see `_arms`; every stratum (model
    and site) must hold one SAE of each of the two arms, so that pairs can be matched on it."""
    path, sae_dirs = Path(path), [Path(d) for d in sae_dirs]
    if path.exists():
        raise StudyError(f"{path} already exists; a study is never overwritten: choose another path or remove it")
    if latents_per_sae < 1:
        raise StudyError(f"--latents-per-sae must be at least 1, got {latents_per_sae}")
    arm_of = _arms(sae_dirs, arms)
    if len(set(arm_of)) != 2:
        raise StudyError(f"a study compares two arms; the SAEs' arms are {sorted(set(arm_of))}")
    loaded = []
    for d in sae_dirs:
        sae = load_sae(d)
        loaded.append((d, sae, *sae.meta.where_it_runs(model, None, context_len, f"{d}/cfg.json")))
    strata = [f"{m} @ {site}" for _, _, m, site, _ in loaded]
    cells = list(zip(arm_of, strata))
    if len(set(cells)) != len(cells):
        raise StudyError("two SAEs of the same arm at the same model and site; each stratum holds one SAE per arm")
    for s in set(strata):
        if sorted(a for a, t in cells if t == s) != sorted(set(arm_of)):
            raise StudyError(f"stratum {s!r} lacks an SAE of one arm: pairs are matched on model and site, so each "
                             "model and site needs one SAE of each arm")

    saes, items, lm = [], [], None
    for index, ((d, sae, m, site, ctx), arm) in enumerate(zip(loaded, arm_of)):
        if lm is None or lm.name != m:
            lm = load_lm(m, device=device, dtype=dtype)
        contexts = eval_contexts(lm, DataConfig(source=source, context_len=ctx), tokens, batch_size)
        print(f"{d}: collecting examples of {sae.d_sae} latents over {contexts.numel():,} held-out tokens",
              file=sys.stderr)
        examples = collect_latent_examples(lm, sae, contexts, site=site, top_n=top_n, batch_size=batch_size,
                                           seed=seed, name=d.name, progress=progress)
        rng = np.random.default_rng([seed, index])
        latents = sample_live_latents(examples.firing_counts.tolist(), latents_per_sae, rng, str(d))
        live = int((examples.firing_counts > 0).sum())
        saes.append(StudySAE(arm, strata[index], str(d), {
            "name": d.name, "variant": sae.variant(), "d_sae": sae.d_sae,
            "training_l0": sae.meta.training.l0 if sae.meta.training else None, "live_latents": live,
            "heldout_tokens": int(examples.info["n_tokens"])}))
        items += [StudyItem(index, latent, latent_page(examples, latent, blind=True)) for latent in latents]
    settings = {"latents_per_sae": latents_per_sae, "tokens": tokens, "source": source, "top_n": top_n,
                "sampling": "uniform without replacement among latents with a non-zero firing count on the "
                            "held-out tokens"}
    return create_study(path, saes, items, seed=seed, settings=settings, raters=tuple(raters))
