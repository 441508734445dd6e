"""The training recipe of issue 12: L0 targets, centred resampling, run-length schedules, outliers and held-out MSE."""

from __future__ import annotations

import json

import pytest
import torch

from saeforge.config import ConfigError, DataConfig, ModelConfig, RunConfig, SAESpec, TrainConfig
from saeforge.data.cache import CacheWriter
from saeforge.saes import ReluSAE, load_sae
from saeforge.training import SyntheticStream, Trainer
from saeforge.training.optim import ConstrainedAdam
from saeforge.training.resample import effective_sample_size, resample_dead_latents
from saeforge.training.schedules import StepPlan


def test_the_l0_controller_reaches_its_target_on_synthetic_data(tmp_path):
    d_in, batch, steps, target = 32, 128, 600, 8.0
    train = TrainConfig(tokens=steps * batch, batch_size=batch, out_dir=str(tmp_path / "run"), lr=1e-2,
                        tensorboard=False, log_every=50, checkpoint_every=10**6, l0_control_frac=0.8,
                        resample_sample_tokens=512, heldout_tokens=0)
    specs = [SAESpec("relu", d_sae=128, target_l0=target, name="relu"),
             SAESpec("gated", d_sae=128, target_l0=target, name="gated")]
    trainer = Trainer(RunConfig(train=train, sae=specs), stream=SyntheticStream(d_in, batch, seed=3), progress=False)
    result = trainer.run()
    held_out = SyntheticStream(d_in, 4096, seed=3)
    held_out.batches = 10**6  # data the run never saw
    x = next(held_out)["x"]
    for name, run in trainer.runs.items():
        l0 = float((load_sae(result.sae_dirs[name]).encode(x) > 0).float().sum(-1).mean())
        assert abs(l0 / target - 1) < 0.15, (name, l0)
        # lambda moved from its start (1.0), and was frozen for the last 20% of the steps
        assert run.sparsity_coeff != 1.0 and run.coeff(steps - 1) == run.coeff(int(0.8 * steps)) == run.sparsity_coeff
        record = json.loads((result.sae_dirs[name] / "cfg.json").read_text())["training"]
        assert record["target_l0"] == target and record["sparsity_coeff"] == pytest.approx(run.sparsity_coeff)
        assert abs(record["l0"] / target - 1) < 0.15


def test_resampled_rows_point_along_the_centred_inputs():
    torch.manual_seed(0)
    d_in, n = 16, 512
    mean = torch.zeros(d_in)
    mean[3] = 50.0  # a large common mean, as on Gemma's residual stream
    inputs = mean + torch.randn(n, d_in)
    sae = ReluSAE(d_in, 8)
    sae.init_b_dec(inputs, method="mean")
    dead = torch.zeros(8, dtype=torch.bool)
    dead[[1, 4, 6]] = True
    optimizer = ConstrainedAdam(list(sae.parameters()), unit_norm_rows=[sae.W_dec], lr=1e-3, betas=(0.0, 0.999))
    idx, ess = resample_dead_latents(sae, optimizer, dead, inputs, torch.Generator().manual_seed(1), loss_power=1.0)
    assert idx.tolist() == [1, 4, 6] and 1 <= ess <= n
    centred = torch.nn.functional.normalize(inputs - sae.b_dec.detach(), dim=1)
    rows = sae.W_dec.detach()[idx]
    assert torch.allclose(rows.norm(dim=1), torch.ones(3))
    # each new row is one input's centred direction, not the mean direction the raw inputs share
    assert torch.allclose((rows @ centred.T).max(dim=1).values, torch.ones(3), atol=1e-5)
    assert (rows @ torch.nn.functional.normalize(mean, dim=0)).abs().max() < 0.9
    raw_cos = torch.nn.functional.normalize(inputs, dim=1) @ torch.nn.functional.normalize(mean, dim=0)
    assert raw_cos.min() > 0.99  # what raw inputs would have given


def test_effective_sample_size():
    assert effective_sample_size(torch.ones(100)) == pytest.approx(100)
    assert effective_sample_size(torch.tensor([0.0, 5.0, 0.0])) == pytest.approx(1)
    weights = torch.tensor([1.0, 1.0, 2.0])
    assert effective_sample_size(weights) == pytest.approx(16 / 6)


def test_step_counts_scale_with_the_run_unless_given():
    plan = StepPlan.of(TrainConfig(), 2000)
    assert (plan.lr_warmup, plan.sparsity_warmup, plan.resample_every, plan.resample_until, plan.dead_window,
            plan.resample_lr_warmup, plan.heldout_every, plan.l0_control_until) == (100, 100, 250, 1000, 250, 62, 100,
                                                                                    1600)
    given = StepPlan.of(TrainConfig(lr_warmup_steps=7, resample_every=30, resample_until=90, dead_window_steps=11,
                                    resample_lr_warmup_steps=0, sparsity_warmup_steps=0), 2000)
    assert (given.lr_warmup, given.resample_every, given.resample_until, given.dead_window, given.resample_lr_warmup,
            given.sparsity_warmup) == (7, 30, 90, 11, 0, 0)


@pytest.mark.parametrize("bad, field", [
    (dict(target_l0=float("nan")), "target_l0"), (dict(target_l0=-3.0), "target_l0"),
    (dict(architecture="topk", k=4, target_l0=4.0), "target_l0"), (dict(sparsity_coeff=float("nan")), "sparsity_coeff"),
])
def test_bad_sae_settings_are_refused_by_name(bad, field):
    with pytest.raises(ConfigError, match=f"sae.{field}"):
        SAESpec(**bad)


@pytest.mark.parametrize("section, bad, field", [
    (DataConfig, dict(max_norm_ratio=float("nan")), "max_norm_ratio"), (DataConfig, dict(max_epochs=0), "max_epochs"),
    (TrainConfig, dict(l0_control_frac=float("nan")), "l0_control_frac"),
    (TrainConfig, dict(resample_loss_power=float("inf")), "resample_loss_power"),
    (TrainConfig, dict(l0_control_rate=-1.0), "l0_control_rate"), (TrainConfig, dict(lr=float("nan")), "lr"),
])
def test_bad_recipe_fields_are_refused_by_name(section, bad, field):
    with pytest.raises(ConfigError, match=field):
        section(**bad)


def test_default_specs_aim_at_an_l0(tmp_path):
    assert SAESpec().target_l0 == 40 and SAESpec("relu", sparsity_coeff=2.0).target_l0 is None
    assert SAESpec("topk", k=8).target_l0 is None


def test_training_from_a_cache_for_several_epochs_logs_held_out_mse_and_outliers(tmp_path):
    d, n = 16, 600
    g = torch.Generator().manual_seed(0)
    features = torch.randn(48, d, generator=g)

    def rows(count):
        codes = (torch.rand(count, 48, generator=g) < 0.08) * torch.rand(count, 48, generator=g)
        return codes @ features + 3.0

    for name, split, x in (("train", "train", rows(n)), ("eval", "eval", rows(256))):
        if split == "train":
            x[[5, 77, 300]] *= 30.0  # planted attention sinks
        writer = CacheWriter(tmp_path / name, dtype="float32", shard_tokens=100, grad=False)
        writer.add(x)
        writer.finish(model="m", site="s", d_in=d, scale=1.0, context_len=16, keep_bos=False, split=split)
    cfg = RunConfig(
        model=ModelConfig(name="m", site="s"),
        data=DataConfig(cache_dir=str(tmp_path / "train"), heldout_cache_dir=str(tmp_path / "eval"),
                        buffer_tokens=200),
        train=TrainConfig(tokens=5 * (n - 3), batch_size=(n - 3) // 3, out_dir=str(tmp_path / "run"), lr=1e-2,
                          tensorboard=False, log_every=5, heldout_every=5, heldout_tokens=256, resample=False),
        sae=[SAESpec("relu", d_sae=32, sparsity_coeff=0.5, name="relu")])
    trainer = Trainer(cfg, progress=False)
    result = trainer.run()
    assert result.steps == 15 and not result.data_exhausted  # five epochs over the 597 ordinary tokens
    assert result.excluded_tokens == 3 * 5  # the three sinks, left out again in every epoch
    metrics = result.metrics["relu"]
    assert metrics["epoch"] == 5 and metrics["excluded_tokens"] == 15
    assert 0 < metrics["train_mse"] and 0 < metrics["heldout_mse"]
    saved = json.loads((result.sae_dirs["relu"] / "cfg.json").read_text())
    assert saved["saeforge"]["max_input_norm"] == pytest.approx(trainer.stream.max_input_norm)
    assert saved["training"]["excluded_tokens"] == 15
    assert saved["training"]["heldout_mse"] == pytest.approx(metrics["heldout_mse"])
    assert load_sae(result.sae_dirs["relu"]).meta.max_input_norm == saved["saeforge"]["max_input_norm"]
