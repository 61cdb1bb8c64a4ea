"""FORA and mask schedules, source steps and EOCConfig presets (docs/DESIGN.md §2)."""

import pytest
import torch

from eoc_dit import EOCConfig, FORASchedule, MaskSchedule
from eoc_dit.planner import make_plan
from eoc_dit.schedules import TaylorSeerSchedule


def taylorseer_full_steps(num_steps, interval, first_enhance):
    """TaylorSeer-DiT's cal_type run step by step: steps count down from num_steps − 1, a step is full in the
    first first_enhance steps or when the counter reaches interval − 1. Returned in sampling order (t = 0 first)."""
    counter, full = 0, []
    for step in reversed(range(num_steps)):
        if step > num_steps - first_enhance - 1 or counter == interval - 1:
            counter = 0
            full.append(True)
        else:
            counter += 1
            full.append(False)
    return full


def test_fora_mask_pattern():
    mask = FORASchedule(3).mask(8, 2)
    assert mask.shape == (8, 2, 2) and mask.dtype == torch.bool
    assert mask[:, 0, 0].tolist() == [True, False, False, True, False, False, True, False]
    assert (mask == mask[:, :1, :1]).all()  # every block and branch follows the step


def test_fora_warmup_counts_from_warmup():
    assert FORASchedule(3, warmup=2).mask(9, 1)[:, 0, 0].tolist() == [True, True, True, False, False, True,
                                                                       False, False, True]


@pytest.mark.parametrize("interval", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("first_enhance", [1, 2, 3])
def test_taylorseer_schedule_is_their_cal_type(interval, first_enhance):
    schedule = TaylorSeerSchedule(interval, warmup_steps=first_enhance)
    assert schedule.mask(20, 1)[:, 0, 0].tolist() == taylorseer_full_steps(20, interval, first_enhance)
    assert torch.equal(schedule.mask(20, 2), FORASchedule(interval, warmup=first_enhance - 1).mask(20, 2))
    assert schedule.prefix_stable and repr(schedule) == f"TaylorSeerSchedule(interval={interval}, " \
                                                         f"warmup_steps={first_enhance})"


def test_taylorseer_default_is_not_fora_warmup_2():
    # "2 full warm-up steps, then one every N" as TaylorSeer runs it: 0, 1, then 1 + 4j.
    assert [t for t, full in enumerate(TaylorSeerSchedule(4).mask(12, 1)[:, 0, 0].tolist()) if full] == [0, 1, 5, 9]
    assert [t for t, full in enumerate(FORASchedule(4, warmup=2).mask(12, 1)[:, 0, 0].tolist()) if full] == [0, 1, 2,
                                                                                                              6, 10]
    with pytest.raises(ValueError, match="warmup_steps"):
        TaylorSeerSchedule(4, warmup_steps=0)


def test_fora_caching_level():
    assert FORASchedule(4).caching_level == pytest.approx(0.75)
    # Over 20 steps interval 3 computes steps 0, 3, ..., 18: 7 of 20.
    assert FORASchedule(3).caching_level_for(20, 5) == pytest.approx(13 / 20)
    assert FORASchedule(1).caching_level_for(20, 5) == 0.0


def test_mask_schedule():
    mask = torch.ones(4, 3, 2, dtype=torch.bool)
    mask[2, 1, 0] = False
    schedule = MaskSchedule(mask)
    assert schedule.caching_level == pytest.approx(1 / 24)
    assert schedule.fixed_num_steps == 4
    assert torch.equal(schedule.mask(4, 3), mask)
    mask[3] = False  # the schedule keeps its own copy
    assert schedule.mask(4, 3)[3].all()


def test_source_steps():
    plan = make_plan(FORASchedule(3).mask(8, 1))
    assert (plan.entry(2, 0, 0).source, plan.entry(2, 0, 0).previous) == (0, None)
    assert (plan.entry(4, 0, 1).source, plan.entry(4, 0, 1).previous) == (3, 0)
    assert (plan.entry(7, 0, 0).source, plan.entry(7, 0, 0).previous) == (6, 3)


@pytest.mark.parametrize("args,error,match", [
    ((0,), ValueError, "interval"), ((2.0,), TypeError, "interval"), ((2, -1), ValueError, "warmup"),
    ((True,), TypeError, "interval"),
])
def test_fora_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        FORASchedule(*args)


def test_mask_schedule_bad_arguments():
    with pytest.raises(TypeError, match="mask"):
        MaskSchedule([[True, True]])
    with pytest.raises(TypeError, match="bool"):
        MaskSchedule(torch.ones(3, 2, 2))
    with pytest.raises(ValueError, match=r"\[T, L, 2\]"):
        MaskSchedule(torch.ones(3, 2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask\\[0\\]"):
        MaskSchedule(torch.zeros(3, 2, 2, dtype=torch.bool))
    schedule = MaskSchedule(torch.ones(3, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="step count mismatch.*3.*5"):
        schedule.mask(5, 2)
    with pytest.raises(ValueError, match="block count mismatch.*2.*4"):
        schedule.mask(3, 4)


def test_presets_coefficients():
    assert EOCConfig(mode="delta", theta=0.5).coefficients(5, (3, 0)) == (0.5, 0.0, 0.0)
    assert EOCConfig(mode="trend", theta=0.2).coefficients(5, (3, 0)) == (0.0, 0.0, 0.2)
    # extrapolate: β = θ (t − s) / (s − p)
    assert EOCConfig(mode="extrapolate", theta=1.0).coefficients(5, (3, 0)) == (0.0, pytest.approx(2 / 3), 0.0)
    assert EOCConfig(mode="extrapolate").coefficients(2, (0,)) == (0.0, 0.0, 0.0)  # no earlier compute step
    assert EOCConfig(mode="trend").effective_theta == 0.2 and EOCConfig(mode="delta").effective_theta == 1.0
    assert EOCConfig(mode="trend").needs_prior and not EOCConfig(mode="extrapolate").needs_prior
    assert not EOCConfig(mode="taylorseer").needs_prior and not EOCConfig(mode="hicache").needs_prior
    with pytest.raises(ValueError, match="latest first"):
        EOCConfig(mode="extrapolate").coefficients(5, (0, 3))
    with pytest.raises(ValueError, match="at least one"):
        EOCConfig(mode="extrapolate").coefficients(5, ())


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(mode="calibrated", theta=1.0), ValueError, "no meaning"),
    (dict(mode="bogus"), ValueError, "mode"),
    (dict(theta="1"), TypeError, "theta"),
    (dict(theta=float("nan")), TypeError, "theta"),
    (dict(judge_threshold=-0.1), ValueError, "judge_threshold"),
    (dict(min_gain=True), TypeError, "min_gain"),
    (dict(token_threshold=None), TypeError, "token_threshold"),
    (dict(backend="cuda-graph"), ValueError, "backend"),
])
def test_config_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        EOCConfig(**kwargs)
