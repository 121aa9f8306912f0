import math

import pytest

from trainer.train import schedule as S


def test_cos_anneal_endpoints_and_midpoint():
    assert S.anneal_cos(1, 0, 0) == pytest.approx(1)
    assert S.anneal_cos(1, 0, 1) == pytest.approx(0)
    assert S.anneal_cos(1, 0, 0.5) == pytest.approx(0.5)


def test_one_cycle_against_its_formula():
    sched = S.one_cycle(pct_start=0.25, div=25, div_final=1e4, moms=(0.95, 0.85, 0.95))
    for pos in [0, 0.1, 0.25, 0.5, 0.9, 1.0]:
        if pos < 0.25:
            p = pos / 0.25
            lr = 1 / 25 + (1 + math.cos(math.pi * (1 - p))) * (1 - 1 / 25) / 2
            mom = 0.95 + (1 + math.cos(math.pi * (1 - p))) * (0.85 - 0.95) / 2
        else:
            p = (pos - 0.25) / 0.75
            lr = 1 + (1 + math.cos(math.pi * (1 - p))) * (1 / 25e4 - 1) / 2
            mom = 0.85 + (1 + math.cos(math.pi * (1 - p))) * (0.95 - 0.85) / 2
        assert sched.lr(pos) == pytest.approx(lr)
        assert sched.mom(pos) == pytest.approx(mom)
    assert sched.lr(0.25) == pytest.approx(1.0)
    assert sched.mom(0.25) == pytest.approx(0.85)


def test_sgdr_cycles_restart_at_the_top():
    lengths = S.sgdr_cycle_lengths(3, 1, 2)
    assert lengths == [1, 2, 4] and sum(lengths) == 7
    sched = S.sgdr(lengths)
    # cycle boundaries at 1/7 and 3/7 of training: lr back to the peak
    assert sched.lr(0) == pytest.approx(1)
    assert sched.lr(1 / 7) == pytest.approx(1)
    assert sched.lr(3 / 7) == pytest.approx(1)
    assert sched.lr(1 / 7 - 1e-9) == pytest.approx(0, abs=1e-6)
    # middle of the 4-epoch cycle: half the peak
    assert sched.lr(5 / 7) == pytest.approx(0.5)


def test_sgdr_cycle_mult_one_is_plain_restarts():
    sched = S.sgdr(S.sgdr_cycle_lengths(4, 2, 1))
    assert [round(sched.lr(k / 4), 6) for k in range(4)] == [1, 1, 1, 1]


def test_warmup_cosine_and_constant():
    sched = S.warmup_cosine(0.1)
    assert sched.lr(0) == 0 and sched.lr(0.05) == pytest.approx(0.5) and sched.lr(0.1) == pytest.approx(1)
    assert sched.lr(0.55) == pytest.approx(0.5) and sched.lr(1) == pytest.approx(0)
    assert S.constant_schedule().lr(0.7) == 1


def test_combine_checks_fractions():
    with pytest.raises(ValueError):
        S.combine([0.5, 0.6], [S.constant(1), S.constant(2)])


def test_exponential_ramp():
    ramp = S.exponential_ramp(1e-7, 10)
    assert ramp(0) == pytest.approx(1e-7) and ramp(1) == pytest.approx(10)
    assert ramp(0.5) == pytest.approx(math.sqrt(1e-7 * 10))
