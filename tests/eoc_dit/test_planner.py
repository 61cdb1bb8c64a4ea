"""The planner on its own: no model, no device (docs/DESIGN.md §2, §7).

Property tests on random masks: every reuse entry has a valid source (and previous) step, and
simulating the plan's writes into cache generations shows that no entry ever reads a slot before it
is written, nor a slot overwritten since its source (or previous) step computed.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eoc_dit import EOCConfig
from eoc_dit.planner import make_plan
from eoc_dit.prior import CoefficientFit


@st.composite
def masks(draw):
    T = draw(st.integers(1, 12))
    L = draw(st.integers(1, 4))
    bits = draw(st.lists(st.booleans(), min_size=T * L * 2, max_size=T * L * 2))
    mask = torch.tensor(bits, dtype=torch.bool).view(T, L, 2)
    mask[0] = True
    return mask


def _computes_between(mask, lo, hi, l, k):
    return [t for t in range(lo + 1, hi) if mask[t, l, k]]


def _check_plan(plan, mask):
    T, L, _ = mask.shape
    assert set(plan.entries) == {(t, l, k) for t in range(T) for l in range(L) for k in range(2) if not mask[t, l, k]}
    slots = {}  # (generation, block, branch) -> step whose output it holds
    for t in range(T):
        for l in range(L):
            for k in range(2):
                if mask[t, l, k]:
                    continue
                e = plan.entry(t, l, k)
                assert 0 <= e.source < t and mask[e.source, l, k]
                assert not _computes_between(mask, e.source, t, l, k)  # the LATEST compute step
                if e.previous is None:
                    assert mask[: e.source, l, k].sum() == 0 and e.coef[1] == 0.0
                else:
                    assert 0 <= e.previous < e.source and mask[e.previous, l, k]
                    assert not _computes_between(mask, e.previous, e.source, l, k)
                assert 0 <= e.generation < plan.num_generations
                # What the ops read was written at the right step and not overwritten since.
                assert slots.get((e.generation, l, k)) == e.source
                if e.coef[1] != 0.0:
                    assert plan.num_generations == 2
                    assert slots.get((1 - e.generation, l, k)) == e.previous
        for l in range(L):  # this step's writes land after its reads (a branch's inputs come first)
            for k in range(2):
                if mask[t, l, k]:
                    slots[(plan.write_generation(t, l, k), l, k)] = t
        # Segments: every fully reused block is in exactly one maximal run of fully reused blocks.
        reused = [not bool(mask[t, l].any()) for l in range(L)]
        for l in range(L):
            segment = plan.segment(t, l)
            if not reused[l]:
                assert segment is None
                continue
            assert segment.start <= l < segment.stop and all(reused[segment.start : segment.stop])
            assert segment.start == 0 or not reused[segment.start - 1]
            assert segment.stop == L or not reused[segment.stop]
            assert segment.entries == tuple(plan.entry(t, b, k) for b in range(segment.start, segment.stop)
                                            for k in range(2))


@settings(max_examples=150, deadline=None)
@given(masks(), st.sampled_from([None, 0.5, 1.0, 2.0]))
def test_random_masks_give_valid_plans(mask, theta):
    config = None if theta is None else EOCConfig(mode="extrapolate", theta=theta)
    plan = make_plan(mask, config)
    _check_plan(plan, mask)
    reads_previous = any(e.coef[1] != 0.0 for e in plan.entries.values())
    assert plan.num_generations == (2 if reads_previous else 1)


@settings(max_examples=100, deadline=None)
@given(masks(), st.integers(0, 2**31 - 1))
def test_random_fits_give_valid_plans(mask, seed):
    generator = torch.Generator().manual_seed(seed)
    coef = torch.randn(*mask.shape, 3, generator=generator)
    coef[..., [0, 2]] = 0.0  # no prior here: the sample's own trend only, as the default fitting terms
    for t in range(mask.shape[0]):  # as fit_coefficients leaves them: no β where there is no Cp
        for l in range(mask.shape[1]):
            for k in range(2):
                if mask[t, l, k] or mask[:t, l, k].sum() < 2:
                    coef[t, l, k, 1] = 0.0
    coef[mask] = 0.0
    plan = make_plan(mask, EOCConfig(), fit=CoefficientFit(mask, coef, {}), two_generations=bool(seed % 2))
    _check_plan(plan, mask)
    for (t, l, k), entry in plan.entries.items():
        assert entry.coef == tuple(coef[t, l, k].tolist())


def test_two_generations_only_when_cp_is_read():
    mask = torch.tensor([True, False, False, True, False, True])[:, None, None].expand(6, 2, 2).clone()
    assert make_plan(mask).num_generations == 1
    assert make_plan(mask, two_generations=True).num_generations == 2
    assert make_plan(mask, EOCConfig(mode="extrapolate")).num_generations == 2  # step 4 has p = 0


def test_plan_refuses_what_a_run_cannot_follow():
    mask = torch.ones(4, 1, 2, dtype=torch.bool)
    mask[2] = False
    with pytest.raises(ValueError, match="mask\\[0\\]"):
        make_plan(torch.zeros(3, 1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor"):
        make_plan(mask.float())
    with pytest.raises(ValueError, match="needs coefficients fitted"):
        make_plan(mask, EOCConfig())
    with pytest.raises(ValueError, match="needs a prior"):
        make_plan(mask, EOCConfig(mode="trend"))
    coef = torch.zeros(4, 1, 2, 3)
    with pytest.raises(ValueError, match="another schedule mask"):
        make_plan(mask, EOCConfig(), fit=CoefficientFit(torch.ones_like(mask), coef, {}))
    coef[2, 0, 0, 1] = 0.5  # β where there is no Cp: only step 0 and 1 computed ... but p exists
    assert make_plan(mask, EOCConfig(), fit=CoefficientFit(mask, coef, {})).entry(2, 0, 0).coef[1] == 0.5
    early = torch.ones(3, 1, 2, dtype=torch.bool)
    early[1] = False
    coef = torch.zeros(3, 1, 2, 3)
    coef[1, 0, 0, 1] = 0.5  # step 1 reuses step 0, nothing before it: no Cp exists
    with pytest.raises(ValueError, match="no compute step before its source"):
        make_plan(early, EOCConfig(), fit=CoefficientFit(early, coef, {}))
    coef[1, 0, 0] = torch.tensor([0.0, float("nan"), 0.0])
    with pytest.raises(ValueError, match="non-finite"):
        make_plan(early, EOCConfig(), fit=CoefficientFit(early, coef, {}))
    coef[1, 0, 0] = torch.tensor([0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="needs the prior"):
        make_plan(early, EOCConfig(), fit=CoefficientFit(early, coef, {}))

