"""The trainer on synthetic activation streams: many SAEs per stream, resampling, failures, saved SAEs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from saeforge.config import RunConfig, SAESpec, TrainConfig
from saeforge.saes import load_sae
from saeforge.training import SyntheticStream, Trainer, TrainingError, latest_checkpoint, load_checkpoint

D_IN, BATCH = 16, 32


def config(tmp_path, saes, **train) -> RunConfig:
    base = dict(tokens=10 * BATCH, batch_size=BATCH, out_dir=str(tmp_path / "run"), lr=1e-2, lr_warmup_steps=2,
                checkpoint_every=4, log_every=5, tensorboard=False, resample_every=4, dead_window_steps=2,
                resample_sample_tokens=64, aux_k_dead_tokens=2 * BATCH, seed=1)
    base.update(train)
    return RunConfig(train=TrainConfig(**base), sae=saes)


def stream(**kwargs) -> SyntheticStream:
    return SyntheticStream(D_IN, BATCH, grad=True, seed=7, **kwargs)


MIXED = [SAESpec("relu", d_sae=48, sparsity_coeff=0.5), SAESpec("gated", d_sae=32, sparsity_coeff=0.5),
         SAESpec("topk", d_sae=48, k=3), SAESpec("gradient_topk", d_sae=48, k=3, options={"beta": 3.0})]


def test_many_saes_per_stream_match_each_trained_alone(tmp_path):
    together = Trainer(config(tmp_path / "all", MIXED), stream=stream(), progress=False)
    together.run()
    assert together.resamples  # the resampling batches are drawn in both settings
    for spec in MIXED:
        alone = Trainer(config(tmp_path / spec.architecture, [spec]), stream=stream(), progress=False)
        alone.run()
        (name, run), = alone.runs.items()
        mine = together.runs[name]
        for key, value in run.sae.state_dict().items():
            assert torch.equal(value, mine.sae.state_dict()[key]), f"{name}.{key}"
        assert torch.equal(run.tracker.counts, mine.tracker.counts)


def test_resampling_revives_dead_latents(tmp_path):
    def train(resample: bool):
        specs = [SAESpec("relu", d_sae=64, sparsity_coeff=0.1, name="relu"),
                 SAESpec("gated", d_sae=64, sparsity_coeff=0.1, name="gated")]
        cfg = config(tmp_path / str(resample), specs, tokens=14 * BATCH, resample=resample, resample_every=10,
                     resample_until=10, dead_window_steps=5, resample_sample_tokens=256, resample_lr_warmup_steps=4)
        trainer = Trainer(cfg, stream=stream(), progress=False)
        trainer.prepare()
        with torch.no_grad():  # latents 0..31 can never fire: the state resampling exists to repair
            trainer.runs["relu"].sae.b_enc[:32] = -1e4
            trainer.runs["gated"].sae.b_gate[:32] = -1e4
        return trainer, trainer.run()

    def dead_fraction(sae_dir) -> float:
        sae = load_sae(sae_dir)
        held_out = SyntheticStream(D_IN, 2048, seed=7)
        held_out.batches = 10_000  # data the run never saw
        return float(((sae.encode(next(held_out)["x"]) > 0).sum(0) == 0).float().mean())

    _, without = train(False)
    trainer, result = train(True)
    assert [(e["sae"], e["step"]) for e in result.resamples] == [("relu", 10), ("gated", 10)]
    assert all(e["n_resampled"] >= 32 for e in result.resamples)
    for name in ("relu", "gated"):
        before, after = dead_fraction(without.sae_dirs[name]), dead_fraction(result.sae_dirs[name])
        assert before >= 0.5 and after < 0.25, (name, before, after)
        # Paper A: the LR dropped to 0.1x at the resample and is back on its way up (cosine over 4 steps).
        schedule = trainer.runs[name].lr_schedule
        assert schedule.last_resample_step == 10
        assert schedule(9) == pytest.approx(1e-2)
        assert schedule(10) == pytest.approx(1e-3)
        assert 1e-3 < schedule(12) < 1e-2
        assert schedule(14) == pytest.approx(1e-2)


def test_a_non_finite_stored_gradient_names_the_step_and_the_gradient_saes(tmp_path):
    class InfGradAtBatch(SyntheticStream):
        def _make(self, index):
            batch = super()._make(index)
            if index == 3:
                batch["grad"][0, 1] = float("inf")
            return batch

    cfg = config(tmp_path, [MIXED[0], MIXED[3]], checkpoint_every=2, resample=False)
    with pytest.raises(TrainingError) as err:
        Trainer(cfg, stream=InfGradAtBatch(D_IN, BATCH, grad=True, seed=7), progress=False).run()
    message = str(err.value)
    assert "step 4" in message and "0 NaN and 1 Inf" in message and "gradient" in message
    assert "gradient_topk_w48_k3" in message and "relu_w48" not in message.split("SAE")[1]
    assert "step_000000002" in message  # the last good checkpoint


def test_nan_in_the_data_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    class NaNAtBatch(SyntheticStream):
        def _make(self, index):
            batch = super()._make(index)
            if index == 5:
                batch["x"][3, 2] = float("nan")
            return batch

    cfg = config(tmp_path, MIXED[:2], checkpoint_every=2, resample=False)
    with pytest.raises(TrainingError) as err:
        Trainer(cfg, stream=NaNAtBatch(D_IN, BATCH, grad=True, seed=7), progress=False).run()
    message = str(err.value)
    assert "step 6" in message and "1 NaN" in message and "relu_w48_l0.5" in message
    assert "step_000000004" in message
    path = latest_checkpoint(tmp_path / "run" / "checkpoints")
    step, state = load_checkpoint(path)
    assert step == 4
    assert all(torch.isfinite(v).all() for v in state["saes"]["gated_w32_l0.5"]["weights"].values())


def test_non_finite_loss_names_the_sae_and_step(tmp_path):
    class HugeAtBatch(SyntheticStream):
        def _make(self, index):
            batch = super()._make(index)
            if index == 3:
                batch["x"] *= 1e22  # finite data whose squared error overflows float32
            return batch

    cfg = config(tmp_path, MIXED[:1], checkpoint_every=2, resample=False)
    with pytest.raises(TrainingError, match=r"SAE 'relu_w48_l0.5': the loss is inf at step 4"):
        Trainer(cfg, stream=HugeAtBatch(D_IN, BATCH, grad=True, seed=7), progress=False).run()
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_000000002"


def test_running_out_of_data_ends_cleanly(tmp_path, capsys):
    cfg = config(tmp_path, MIXED[2:3], tokens=100 * BATCH, resample=False)
    result = Trainer(cfg, stream=stream(max_tokens=7 * BATCH + 5), progress=False).run()
    assert result.data_exhausted and result.steps == 7 and result.tokens_seen == 7 * BATCH
    assert "ran out after 224 tokens (7 steps)" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_000000007"
    assert load_sae(result.sae_dirs["topk_w48_k3"]).d_sae == 48


@pytest.mark.parametrize("normalize", ["centered", "uncentered"])
def test_saved_saes_work_on_raw_activations(tmp_path, normalize):
    data = stream()
    trainer = Trainer(config(tmp_path, MIXED, resample=False, normalize=normalize), stream=data, progress=False)
    result = trainer.run()
    c = trainer.scale
    # The normalisation the run asked for, measured on the stream's own statistics sample.
    sample = data.training_sample(10_000).double()
    centre = sample.mean(0) if normalize == "centered" else 0.0
    assert float((c * (sample - centre)).pow(2).sum(1).mean()) == pytest.approx(D_IN, rel=1e-6)
    batch = SyntheticStream(D_IN, 64, grad=True, seed=99)._make(0)
    x, grad = batch["x"], batch["grad"]
    for name, run in trainer.runs.items():
        saved = load_sae(result.sae_dirs[name])
        kwargs = {"grad": grad} if saved.needs_grad else {}
        scaled_kwargs = {"grad": grad / c} if saved.needs_grad else {}
        with torch.no_grad():
            # trained on c*x: the saved SAE reconstructs raw x as the trained one reconstructs c*x, divided by c
            torch.testing.assert_close(saved(x, **kwargs), run.sae(c * x, **scaled_kwargs) / c, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(saved.encode(x, **kwargs), run.sae.encode(c * x, **scaled_kwargs) / c,
                                       rtol=1e-4, atol=1e-5)
        cfg = json.loads((result.sae_dirs[name] / "cfg.json").read_text())
        assert cfg["hook_name"] == "blocks.9.resid_post" and cfg["context_size"] == 128
        assert cfg["activation_scale"] == pytest.approx(c)
        assert cfg["saeforge"]["normalization"] == {"mode": normalize, "scale": pytest.approx(c),
                                                    "mean_norm": pytest.approx(float(sample.mean(0).norm()))}
        assert cfg["saeforge"].get("max_input_norm") is None  # the synthetic stream leaves nothing out
        assert cfg["saeforge"]["architecture"] == saved.architecture
        counts = load_file(str(result.sae_dirs[name] / "sparsity.safetensors"))["firing_counts"]
        assert torch.equal(counts, run.tracker.counts.float())
        assert counts.sum() > 0
    assert result.tokens_seen == 10 * BATCH and result.steps == 10


def test_decoder_rows_stay_unit_norm_during_training(tmp_path):
    trainer = Trainer(config(tmp_path, MIXED), stream=stream(), progress=False)
    trainer.run()
    for run in trainer.runs.values():
        norms = run.sae.W_dec.norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-5)


def test_fresh_run_refuses_to_overwrite_a_checkpoint(tmp_path):
    cfg = config(tmp_path, MIXED[2:3], tokens=4 * BATCH)
    Trainer(cfg, stream=stream(), progress=False).run()
    with pytest.raises(TrainingError, match="already holds a checkpoint"):
        Trainer(cfg, stream=stream(), progress=False).run()
    assert Trainer(cfg, stream=stream(), progress=False).run(overwrite=True).steps == 4


def test_resume_with_another_config_is_refused(tmp_path):
    Trainer(config(tmp_path, MIXED[2:3], tokens=4 * BATCH), stream=stream(), progress=False).run()
    other = config(tmp_path, [SAESpec("topk", d_sae=48, k=5)], tokens=8 * BATCH)
    with pytest.raises(TrainingError, match=r"different config \(sections \['sae'\]\)"):
        Trainer(other, stream=stream(), progress=False).run(resume=True)


def test_bf16_autocast_trains(tmp_path):
    trainer = Trainer(config(tmp_path, MIXED, compute_dtype="bfloat16"), stream=stream(), progress=False)
    result = trainer.run()
    for name, metrics in result.metrics.items():
        assert torch.isfinite(torch.tensor(metrics["loss"])), name
    first = Trainer(config(tmp_path / "short", MIXED, compute_dtype="bfloat16", tokens=BATCH), stream=stream(),
                    progress=False).run()
    for name in result.metrics:  # training lowered the reconstruction error
        assert result.metrics[name]["recon"] < first.metrics[name]["recon"], name


def test_rescale_and_shift_trains_only_magnitudes_of_a_trained_baseline(tmp_path):
    """Paper A's "baseline + rescale & shift": gate, decoder and b_dec stay the baseline's; r_mag, b_mag learn;
    reconstruction gets no worse than the baseline it starts from."""
    base = Trainer(config(tmp_path / "a", [SAESpec("relu", name="base", d_sae=48, sparsity_coeff=0.5)]),
                   stream=stream(), progress=False).run()
    relu = load_sae(base.sae_dirs["base"])
    spec = SAESpec("gated", name="rescaled", d_sae=48, options={"rescale_shift_from": str(base.sae_dirs["base"])})
    result = Trainer(config(tmp_path / "b", [spec], lr=3e-2), stream=stream(), progress=False).run()
    gated = load_sae(result.sae_dirs["rescaled"])
    assert gated.magnitude_only
    for ours, theirs in (("W_enc", "W_enc"), ("b_gate", "b_enc"), ("W_dec", "W_dec"), ("b_dec", "b_dec")):
        torch.testing.assert_close(getattr(gated, ours), getattr(relu, theirs), rtol=1e-5, atol=1e-6)
    assert gated.r_mag.abs().sum() > 0 and not torch.allclose(gated.b_mag, relu.b_enc)
    x = SyntheticStream(D_IN, 512, seed=99)._make(0)["x"]
    with torch.no_grad():
        err_gated = (gated(x) - x).pow(2).sum(-1).mean()
        err_relu = (relu(x) - x).pow(2).sum(-1).mean()
        assert torch.equal(gated._pre_acts(x)[0] > 0, relu.encode(x) > 0)  # the same gate
    assert err_gated < err_relu


def test_rescale_and_shift_needs_a_saved_baseline(tmp_path):
    from saeforge.config import ConfigError

    spec = SAESpec("gated", name="r", d_sae=48, options={"rescale_shift_from": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="missing"):
        Trainer(config(tmp_path, [spec]), stream=stream(), progress=False).run()


def test_hand_derived_steps_train_as_autograd_does(tmp_path, monkeypatch):
    """Whole runs (warmups, resampling, AuxK, constrained Adam) through SAE.loss_and_grads end where the same runs
    through autograd on SAE.loss end, to float32 rounding."""
    from saeforge.saes.base import SAE

    fast = Trainer(config(tmp_path / "fast", MIXED), stream=stream(), progress=False)
    fast.run()
    for cls in {type(run.sae) for run in fast.runs.values()}:
        monkeypatch.setattr(cls, "grads_by_hand", SAE.grads_by_hand)  # None: autograd
    slow = Trainer(config(tmp_path / "autograd", MIXED), stream=stream(), progress=False)
    slow.run()
    assert fast.resamples == slow.resamples
    for name, run in slow.runs.items():
        for key, value in run.sae.state_dict().items():
            torch.testing.assert_close(fast.runs[name].sae.state_dict()[key], value, rtol=1e-4, atol=1e-5,
                                       msg=f"{name}.{key}")
        assert torch.equal(fast.runs[name].tracker.counts, run.tracker.counts)


def test_wandb_logs_offline_and_a_resumed_run_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = [SAESpec("relu", d_sae=48, sparsity_coeff=0.5, name="relu")]
    cfg = config(tmp_path, spec, wandb_project="saeforge-test", log_every=2)
    Trainer(cfg, stream=stream(), progress=False).run()
    out = tmp_path / "run"
    run_id = (out / "wandb_run_id").read_text()

    def segments() -> list:  # offline-run-<time>-<id>, or -<id>-1 when a segment starts in the same second
        return sorted((out / "wandb").glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb"))

    def logged() -> bytes:
        return b"".join(p.read_bytes() for p in segments())

    first = logged()
    for key in (b"relu/loss", b"relu/l0", b"relu/dead_frac", b"tokens_per_s"):
        assert key in first, key
    longer = config(tmp_path, spec, wandb_project="saeforge-test", log_every=2, tokens=14 * BATCH)
    Trainer(longer, stream=stream(), progress=False).run(resume=True)
    assert (out / "wandb_run_id").read_text() == run_id
    assert len(segments()) == 2 and len(logged()) > len(first)  # the resumed steps went to the same W&B run
