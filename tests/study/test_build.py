"""`saeforge rate new` on a tiny saved model: paper A's sampling (uniform among latents that fire), blind pages,
the same study from the same seed, and clear errors."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from saeforge import SAEMetadata, create_sae
from saeforge.cli import main
from saeforge.study.build import build_study, sample_live_latents
from saeforge.study.db import Study, StudyError

SITE = "blocks.1.resid_post"
SRC = Path(__file__).resolve().parents[2] / "src"
DEAD = list(range(0, 128, 3))  # latents of the ReLU SAE that can never fire


def _save(directory: Path, model_dir: Path, architecture: str) -> Path:
    torch.manual_seed(1)
    sae = create_sae(architecture, d_in=64, d_sae=128)
    if architecture == "relu":
        with torch.no_grad():
            sae.b_enc[DEAD] = -1e4
    sae.meta = SAEMetadata(model_name=str(model_dir), site=SITE, context_size=32)
    sae.save(directory)
    return directory


@pytest.fixture(scope="module")
def sae_dirs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("saes")
    return [_save(root / "gated_sae_qwerty", tiny_model_dir, "gated"), _save(root / "relu_sae_asdfg", tiny_model_dir,
                                                                            "relu")]


def test_sampling_is_uniform_among_live_latents():
    counts = np.array([0, 5, 0, 1, 9, 0, 2, 7])
    rng = np.random.default_rng(0)
    drawn = Counter(l for _ in range(4000) for l in sample_live_latents(counts, 2, rng, "x"))
    assert set(drawn) == {1, 3, 4, 6, 7}  # never a dead latent
    # each of the 5 live latents is in a draw of 2 with probability 2/5: 1600 of 4000 (sd ~31)
    assert all(abs(n - 1600) < 150 for n in drawn.values()), drawn
    with pytest.raises(StudyError, match="only 5 latents fire"):
        sample_live_latents(counts, 6, rng, "x")


def test_rate_new_builds_a_blind_study_from_the_seed(tmp_path, sae_dirs, corpus_txt, tiny_model_dir, capsys):
    args = ["--sae", str(sae_dirs[0]), "--sae", str(sae_dirs[1]), "--latents-per-sae", "5", "--seed", "7",
            "--rater", "alice", "--tokens", "512", "--source", str(corpus_txt), "--batch-size", "4",
            "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cli = tmp_path / "cli.sqlite"
    proc = subprocess.run([sys.executable, "-m", "saeforge", "rate", "new", str(cli), *args], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "10 latents" in proc.stdout and "raters: alice" in proc.stdout

    with Study(cli) as study:
        saes = study.saes()
        assert [s.arm for s in saes] == ["gated_sae_qwerty", "relu_sae_asdfg"]
        assert {s.stratum for s in saes} == {f"{tiny_model_dir} @ {SITE}"}
        assert saes[1].info["live_latents"] <= 128 - len(DEAD)
        items = study.con.execute("SELECT sae_id, latent, page FROM items ORDER BY sae_id, latent").fetchall()
    assert Counter(s for s, _, _ in items) == {0: 5, 1: 5}
    assert not {latent for s, latent, _ in items if s == 1} & set(DEAD)
    for _, latent, page in items:
        assert page.startswith("<!DOCTYPE html>") and "Top activations" in page
        for secret in ("gated_sae_qwerty", "relu_sae_asdfg", str(sae_dirs[0].parent), f"latent {latent}"):
            assert secret not in page

    # The same seed draws the same latents (in-process this time); the study file is never overwritten.
    again = build_study(tmp_path / "again.sqlite", sae_dirs, latents_per_sae=5, seed=7, tokens=512,
                        source=str(corpus_txt), batch_size=4, progress=False)
    con = sqlite3.connect(again)
    assert con.execute("SELECT sae_id, latent FROM items ORDER BY sae_id, latent").fetchall() == [
        (s, l) for s, l, _ in items]
    con.close()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["rate", "new", str(cli), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1


def test_bad_requests_are_one_clear_error(tmp_path, sae_dirs, corpus_txt):
    kwargs = dict(tokens=256, source=str(corpus_txt), batch_size=4, progress=False)
    with pytest.raises(StudyError, match="two arms"):
        build_study(tmp_path / "a.sqlite", sae_dirs[:1], **kwargs)
    with pytest.raises(StudyError, match="one per SAE"):
        build_study(tmp_path / "a.sqlite", sae_dirs, arms=("x",), **kwargs)
    with pytest.raises(StudyError, match="same arm at the same model and site"):
        build_study(tmp_path / "a.sqlite", [*sae_dirs, sae_dirs[0]], arms=("x", "y", "x"), **kwargs)
    with pytest.raises(StudyError, match=r"only \d+ latents fire"):
        build_study(tmp_path / "a.sqlite", sae_dirs, latents_per_sae=100, **kwargs)
    assert not list(tmp_path.iterdir())
