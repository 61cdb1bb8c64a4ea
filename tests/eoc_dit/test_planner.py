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
                computed = [s for s in range(t) if mask[s, l, k]]
                assert e.history == tuple(reversed(computed))[:4]  # the latest compute steps, latest first
                assert 0 <= e.source < t and mask[e.source, l, k]
                assert not _computes_between(mask, e.source, t, l, k)  # the LATEST compute step
                assert e.previous == (e.history[1] if len(e.history) > 1 else None)
                assert 3 <= len(e.coef) <= 5 and (len(e.coef) == 3 or e.coef[-1] != 0.0)  # trailing zeros trimmed
                assert e.reads < len(e.history) and e.reads < plan.num_generations  # every C_i read exists
                assert 0 <= e.generation < plan.num_generations
                # What the ops read was written at the right step and not overwritten since: C_0..C_reads, and
                # every C_j the ring keeps (what StepContext.history hands a strategy).
                for j in range(min(len(e.history), plan.num_generations)):
                    assert slots.get((plan.generation_of(e, j), l, k)) == e.history[j]
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
@given(masks(), st.sampled_from(["taylorseer", "hicache"]), st.integers(1, 3))
def test_random_masks_with_forecasters_give_valid_plans(mask, mode, order):
    plan = make_plan(mask, EOCConfig(mode=mode, order=order))
    _check_plan(plan, mask)
    # The ring holds exactly what the entries read: 1 + the largest history index of a non-zero β.
    assert plan.num_generations == 1 + max([e.reads for e in plan.entries.values()], default=0)
    for e in plan.entries.values():
        assert e.reads == min(order, len(e.history) - 1) or not any(e.coef)


def _random_fit(mask, seed, num_coefs):
    """Random coefficients [T, L, 2, P] as a fitter leaves them: no β_i where the entry has i or fewer computes."""
    generator = torch.Generator().manual_seed(seed)
    coef = torch.randn(*mask.shape, num_coefs, generator=generator)
    coef[..., [0, 2]] = 0.0  # no prior here: the sample's own trend only, as the default fitting terms
    for t in range(mask.shape[0]):
        for l in range(mask.shape[1]):
            for k in range(2):
                computes = int(mask[:t, l, k].sum())
                for i, index in ((1, 1), (2, 3), (3, 4)):
                    if index < num_coefs and (mask[t, l, k] or computes <= i):
                        coef[t, l, k, index] = 0.0
    coef[mask] = 0.0
    return coef


@settings(max_examples=100, deadline=None)
@given(masks(), st.integers(0, 2**31 - 1), st.sampled_from([3, 4, 5]), st.integers(1, 4))
def test_random_fits_give_valid_plans(mask, seed, num_coefs, min_generations):
    coef = _random_fit(mask, seed, num_coefs)
    plan = make_plan(mask, EOCConfig(), fit=CoefficientFit(mask, coef, {}), min_generations=min_generations)
    _check_plan(plan, mask)
    assert plan.num_generations == max([min_generations] + [1 + e.reads for e in plan.entries.values()])
    for (t, l, k), entry in plan.entries.items():
        row = coef[t, l, k].tolist()
        assert entry.coef == tuple(row[: max(3, len(entry.coef))]) and not any(row[len(entry.coef):])


def test_generations_only_where_a_history_is_read():
    mask = torch.tensor([True, False, False, True, False, True])[:, None, None].expand(6, 2, 2).clone()
    assert make_plan(mask).num_generations == 1
    assert make_plan(mask, min_generations=2).num_generations == 2
    assert make_plan(mask, EOCConfig(mode="extrapolate")).num_generations == 2  # step 4 has p = 0
    # Three computes (0, 3, 5) before step 6: order 3 reads C_0..C_2 at most, so the ring holds three, not four.
    longer = torch.cat([mask, torch.zeros(1, 2, 2, dtype=torch.bool)])
    assert make_plan(longer, EOCConfig(mode="taylorseer", order=3)).num_generations == 3
    assert make_plan(mask, EOCConfig(mode="taylorseer", order=3)).num_generations == 2
    assert make_plan(mask, EOCConfig(mode="taylorseer", order=1)).num_generations == 2
    entry = make_plan(mask, EOCConfig(mode="taylorseer", order=2)).entry(4, 0, 0)
    assert entry.history == (3, 0) and len(entry.coef) == 3  # only two computes before step 4: order 1 there


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
    two = torch.ones(4, 1, 2, dtype=torch.bool)
    two[2:] = False
    deep = torch.zeros(4, 1, 2, 5)
    deep[3, 0, 1, 3] = 0.25  # β₂ at step 3: only steps 0 and 1 computed, no C_2
    with pytest.raises(ValueError, match="beta2 = 0.25, which reads C_2.*computed only 2 time"):
        make_plan(two, EOCConfig(), fit=CoefficientFit(two, deep, {}))
    deep[3, 0, 1, 3] = 0.0
    deep[2, 0, 0, 4] = 1.0  # β₃
    with pytest.raises(ValueError, match="beta3 = 1.0, which reads C_3"):
        make_plan(two, EOCConfig(), fit=CoefficientFit(two, deep, {}))
    with pytest.raises(ValueError, match="min_generations"):
        make_plan(two, min_generations=5)
    with pytest.raises(ValueError, match="P in"):
        CoefficientFit(two, torch.zeros(4, 1, 2, 6), {})
    with pytest.raises(ValueError, match="P in"):
        CoefficientFit(two, torch.zeros(4, 1, 2), {})
    with pytest.raises(TypeError, match="floating"):
        CoefficientFit(two, torch.zeros(4, 1, 2, 3, dtype=torch.long), {})
    coef[1, 0, 0] = torch.tensor([0.0, float("nan"), 0.0])
    with pytest.raises(ValueError, match="non-finite"):
        make_plan(early, EOCConfig(), fit=CoefficientFit(early, coef, {}))
    coef[1, 0, 0] = torch.tensor([0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="needs the prior"):
        make_plan(early, EOCConfig(), fit=CoefficientFit(early, coef, {}))

