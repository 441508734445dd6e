"""Learning-rate and sparsity-coefficient schedules."""

from __future__ import annotations

import pytest

from saeforge.training import CoeffSchedule, LRSchedule


def test_warmup_then_constant():
    s = LRSchedule(base=1.0, total_steps=100, warmup_steps=10)
    assert s(0) == pytest.approx(0.1) and s(4) == pytest.approx(0.5) and s(9) == 1.0 and s(99) == 1.0


@pytest.mark.parametrize("decay, mid", [("linear", 0.5), ("cosine", 0.5)])
def test_decay_to_zero_over_the_tail(decay, mid):
    s = LRSchedule(base=2.0, total_steps=100, decay=decay, decay_start=80)
    assert s(79) == 2.0
    assert s(90) == pytest.approx(2.0 * mid)
    assert s(100) == pytest.approx(0.0, abs=1e-12)
    assert s(85) > s(95)


def test_resample_drop_and_cosine_recovery():
    s = LRSchedule(base=1.0, total_steps=10_000, resample_drop=0.1, resample_warmup_steps=1000)
    assert s(500) == 1.0
    s.last_resample_step = 500
    assert s(499) == 1.0  # earlier steps are untouched
    assert s(500) == pytest.approx(0.1)
    assert s(1000) == pytest.approx(0.55)  # half-way up the cosine
    assert s(750) == pytest.approx(0.1 + 0.9 * 0.5 * (1 - 2**-0.5))
    assert s(1500) == 1.0
    restored = LRSchedule(base=1.0, total_steps=10_000)
    restored.load_state_dict(s.state_dict())
    assert restored(700) == s(700)


def test_sparsity_coefficient_warmup():
    c = CoeffSchedule(final=4.0, warmup_steps=4)
    assert [c(i) for i in range(6)] == [1.0, 2.0, 3.0, 4.0, 4.0, 4.0]
    assert CoeffSchedule(final=4.0)(0) == 4.0
