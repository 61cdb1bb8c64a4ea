"""The forecasting presets against their authors' code written out (issue 10, K-history correction).

``AuthorsLoopDiT`` is an independent sampler-side loop on the tiny DiT that keeps the forecasters' state
as the authors' code does — TaylorSeer's ``cache_dic`` of per-(layer, module) factor lists, updated at
every full step by ``derivative_approximation`` and evaluated by ``taylor_formula`` (ywlq/TaylorSeer,
``TaylorSeer-DiT/taylor_utils/__init__.py``: steps counting DOWN, negative gaps), and HiCache's
``_hicache_prediction_formula`` (yiming-l21/RA-CFGCache ``models/hicache_fast_impl.py``: steps counting
up, physicists' Hermite polynomials in the feature dtype) — with their ``cal_type`` schedule. Its samples
must equal ``apply_eoc`` with ``EOCConfig(mode="taylorseer" | "hicache")`` under ``TaylorSeerSchedule``,
which goes through the planner's coefficients, the cache ring and the fused ops.
"""

import math

import pytest
import torch

import eoc_kernels
from eoc_dit import CoefficientFit, DDIMSampler, EOCConfig, FORASchedule, MaskSchedule, apply_eoc
from eoc_dit.config import hicache_weights, taylorseer_weights
from eoc_dit.models import modulate
from eoc_dit.planner import make_plan
from eoc_dit.schedules import TaylorSeerSchedule
from tests.eoc_dit.tiny import make_tiny_dit

STEPS = 12


class AuthorsLoopDiT(torch.nn.Module):
    """The DiT forward with TaylorSeer's (``forecaster="taylor"``) or HiCache's (``"hicache"``) caching, as
    their code runs it: ``interval`` and ``first_enhance`` of their ``cal_type``, ``max_order``, and HiCache's
    ``scale_factor`` (σ). TaylorSeer counts steps down from num_steps − 1 (their DiT sampler), HiCache up
    from 0 (their FLUX sampler)."""

    def __init__(self, model, num_steps, interval, max_order, forecaster="taylor", scale_factor=0.5,
                 first_enhance=2):
        super().__init__()
        self.model, self.num_steps, self.interval, self.max_order = model, num_steps, interval, max_order
        self.forecaster, self.scale_factor, self.first_enhance = forecaster, scale_factor, first_enhance
        self.num_classes = model.num_classes
        self.calls = 0
        self.full_steps = []  # in sampling order, for the test's own checks

    # -- their cal_type: full in the first first_enhance steps or when the counter reaches interval − 1
    def _cal_type(self, current, cache_dic):
        if self.forecaster == "taylor":
            first_steps = current["step"] > current["num_steps"] - cache_dic["first_enhance"] - 1
        else:
            first_steps = current["step"] < cache_dic["first_enhance"]
        if first_steps or cache_dic["cache_counter"] == cache_dic["interval"] - 1:
            current["type"] = "full"
            cache_dic["cache_counter"] = 0
            current["activated_steps"].append(current["step"])
        else:
            cache_dic["cache_counter"] += 1
            current["type"] = "Taylor"

    # -- their derivative_approximation: the factor list of (layer, module) after a full step
    def _derivative_approximation(self, cache_dic, current, feature):
        factors = cache_dic["cache"][current["layer"]][current["module"]]
        if self.forecaster == "hicache" and len(current["activated_steps"]) < 2:
            factors[0] = feature
            return
        difference_distance = current["activated_steps"][-1] - current["activated_steps"][-2]
        if self.forecaster == "taylor":  # TaylorSeer-DiT's gate, steps counting down
            gate = current["step"] < current["num_steps"] - cache_dic["first_enhance"] + 1
        else:  # the FLUX / HiCache gate, steps counting up
            gate = current["step"] > cache_dic["first_enhance"] - 2
        updated = {0: feature}
        for i in range(cache_dic["max_order"]):
            if factors.get(i) is not None and gate:
                updated[i + 1] = (updated[i] - factors[i]) / difference_distance
            else:
                break
        cache_dic["cache"][current["layer"]][current["module"]] = updated

    # -- their taylor_formula / _hicache_prediction_formula
    def _forecast(self, cache_dic, current):
        factors = cache_dic["cache"][current["layer"]][current["module"]]
        x = current["step"] - current["activated_steps"][-1]
        if self.forecaster == "taylor":
            output = 0
            for i in range(len(factors)):
                output += (1 / math.factorial(i)) * factors[i] * (x**i)
            return output
        order = min(cache_dic["max_order"], len(factors) - 1)
        if order < 1:
            return factors[0]
        latest = factors[0]
        scale = cache_dic["hicache_scale_factor"]
        x_scaled = torch.tensor(float(x), dtype=latest.dtype) * scale
        pred = latest.clone()
        for k in range(1, order + 1):
            h_prev, h = torch.ones_like(x_scaled), 2 * x_scaled  # physicists' Hermite H_k(x_scaled)
            for n in range(2, k + 1):
                h_prev, h = h, 2 * x_scaled * h - 2 * (n - 1) * h_prev
            pred.add_(factors[k], alpha=float(h / math.factorial(k)) * scale**k)
        return pred

    def forward(self, x, t, y):
        m = self.model
        if self.calls == 0:
            self.cache_dic = {"cache": {l: {"attn": {}, "mlp": {}} for l in range(len(m.blocks))},
                              "interval": self.interval, "max_order": self.max_order,
                              "first_enhance": self.first_enhance, "cache_counter": 0,
                              "hicache_scale_factor": self.scale_factor}
            start = [self.num_steps - 1] if self.forecaster == "taylor" else []  # TaylorSeer-DiT: [49]
            self.current = {"num_steps": self.num_steps, "activated_steps": start}
        index = self.calls
        self.calls += 1
        current, cache_dic = self.current, self.cache_dic
        current["step"] = self.num_steps - 1 - index if self.forecaster == "taylor" else index
        self._cal_type(current, cache_dic)
        self.full_steps.append(current["type"] == "full")
        x = m.x_embedder(x) + m.pos_embed
        c = m.t_embedder(t) + m.y_embedder(y, False)
        for l, block in enumerate(m.blocks):
            current["layer"] = l
            chunks = block.adaLN_modulation(c).chunk(6, dim=1)
            for k, (module, norm, branch) in enumerate((("attn", block.norm1, block.attn),
                                                        ("mlp", block.norm2, block.mlp))):
                current["module"] = module
                shift, scale, gate = chunks[3 * k : 3 * k + 3]
                if current["type"] == "full":
                    feature = branch(modulate(norm(x), shift, scale))
                    self._derivative_approximation(cache_dic, current, feature)
                else:
                    feature = self._forecast(cache_dic, current)
                x = x + gate.unsqueeze(1) * feature
        return m.unpatchify(m.final_layer(x, c))


def close(a, b, rtol):
    torch.testing.assert_close(a, b, atol=rtol * b.abs().max(), rtol=rtol)


@pytest.fixture(scope="module")
def model():
    return make_tiny_dit(seed=3)


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(5)
    return torch.randn(2, 1, 8, 8, generator=generator), torch.tensor([2, 0])


def sample(model, inputs, schedule, config):
    with apply_eoc(model, schedule, config=config):
        return DDIMSampler(STEPS).sample(model, *inputs, cfg_scale=2.0)


_AUTHORS = {}


def authors(model, inputs, interval, order, forecaster, sigma=0.5):
    """The authors' loop's samples (order 0: plain reuse under the same schedule), computed once per setting."""
    key = (id(model), interval, order, forecaster, sigma)
    if key not in _AUTHORS:
        if order == 0:
            _AUTHORS[key] = sample(model, inputs, TaylorSeerSchedule(interval), None)
        else:
            loop = AuthorsLoopDiT(model, STEPS, interval, order, forecaster, scale_factor=sigma)
            _AUTHORS[key] = DDIMSampler(STEPS).sample(loop, *inputs, cfg_scale=2.0)
            assert loop.full_steps == TaylorSeerSchedule(interval).mask(STEPS, 1)[:, 0, 0].tolist()
    return _AUTHORS[key]


def assert_matches(got, expected, lower_order):
    """got equals the authors' samples within fp32 rounding, and far closer than the authors' own samples of
    one order lower are: the comparison tells the orders apart (the final samples are large, ~500, and the
    last order changes them by 1e-4 .. 1e-2, so a relative tolerance alone would not)."""
    close(got, expected, 1e-5)
    order_effect = (expected - lower_order).abs().max()
    assert order_effect > 0 and (got - expected).abs().max() <= 0.05 * order_effect


@pytest.mark.parametrize("interval", [2, 3])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_taylorseer_equals_the_authors_loop(model, inputs, interval, order):
    expected = authors(model, inputs, interval, order, "taylor")
    got = sample(model, inputs, TaylorSeerSchedule(interval), EOCConfig(mode="taylorseer", order=order))
    assert_matches(got, expected, authors(model, inputs, interval, order - 1, "taylor"))


@pytest.mark.parametrize("interval", [2, 3])
@pytest.mark.parametrize("order,sigma", [(1, 0.5), (2, 0.5), (3, 0.5), (2, 0.8)])
def test_hicache_equals_the_authors_loop(model, inputs, interval, order, sigma):
    expected = authors(model, inputs, interval, order, "hicache", sigma)
    got = sample(model, inputs, TaylorSeerSchedule(interval), EOCConfig(mode="hicache", order=order, sigma=sigma))
    assert_matches(got, expected, authors(model, inputs, interval, order - 1, "hicache", sigma))
    if sigma != 0.5:  # σ matters
        assert (expected - authors(model, inputs, interval, order, "hicache")).abs().max() > 0


def test_extrapolate_is_the_old_three_term_formula_bit_for_bit(model, inputs):
    # K = 1 with the old coefficients reproduces the three-term outputs exactly: the preset's β is the old
    # expression θ·(t − s)/(s − p), and plans holding those coefficients as P = 3 or zero-padded to P = 4, 5
    # give the preset's samples bit for bit.
    theta = 1.3
    config = EOCConfig(mode="extrapolate", theta=theta)
    for step, history in ((5, (3, 0)), (7, (6, 3, 0)), (9, (8, 5, 2, 1)), (2, (0,))):
        old = 0.0 if len(history) < 2 else theta * (step - history[0]) / (history[0] - history[1])
        assert config.coefficients(step, history) == (0.0, old, 0.0)
    mask = FORASchedule(3).mask(STEPS, len(model.blocks))
    coef = torch.zeros(*mask.shape, 3)
    for (t, l, k), entry in make_plan(mask).entries.items():
        if entry.previous is not None:
            coef[t, l, k, 1] = theta * (t - entry.source) / (entry.source - entry.previous)
    preset = sample(model, inputs, MaskSchedule(mask), config)
    for width in (3, 4, 5):
        fit = CoefficientFit(mask, torch.cat([coef, torch.zeros(*mask.shape, width - 3)], dim=-1), {})
        with apply_eoc(model, MaskSchedule(mask), config=config) as handle:
            handle.executor.set_plan(make_plan(mask, EOCConfig(), fit=fit))  # the fit's coefficients instead
            assert all(len(e.coef) == 3 for e in handle.plan.entries.values()) and handle.plan.num_generations == 2
            assert torch.equal(DDIMSampler(STEPS).sample(model, *inputs, cfg_scale=2.0), preset)


def test_taylorseer_order_one_is_extrapolation_by_the_step_ratio():
    config = EOCConfig(mode="taylorseer", order=1)
    for step, history in ((5, (3, 0)), (7, (6, 3)), (4, (1, 0))):
        coef = config.coefficients(step, history)
        assert len(coef) == 3 and coef[1] == pytest.approx((step - history[0]) / (history[0] - history[1]))
    assert config.coefficients(3, (1,)) == (0.0, 0.0, 0.0)  # one computed feature: plain reuse


def test_orders_grow_by_one_per_computed_step():
    # TaylorSeer's factor lists: with n computed features, min(order, n − 1) orders.
    for order in (1, 2, 3):
        for n in range(1, 6):
            history = tuple(range(10, 10 - 2 * n, -2))
            weights = taylorseer_weights(11, history, order)
            assert len(weights) == min(order, n - 1) + 1 and math.fsum(weights) == pytest.approx(1.0, abs=1e-12)
            coef = EOCConfig(mode="taylorseer", order=order).coefficients(11, history)
            assert len(coef) == 3 + max(0, min(order, n - 1) - 1)


def test_weights_by_hand():
    # Uniform gaps of 1, k = 1: TaylorSeer order 3 is C_0 + Δ + Δ²/2 + Δ³/6 of backward differences.
    assert taylorseer_weights(6, (5, 4, 3, 2), 3) == pytest.approx((8 / 3, -5 / 2, 1.0, -1 / 6))
    # Uneven gaps, the authors' recursion: factor_2 = ((C_0 − C_1)/4 − (C_1 − C_2)/1)/4, k = 2.
    assert taylorseer_weights(7, (5, 1, 0), 3) == pytest.approx((1.625, -1.125, 0.5))
    # HiCache, σ = 0.5, k = 1: H_1(0.5)·0.5 = 0.5 and H_2(0.5)/2·0.25 = −0.125.
    assert hicache_weights(6, (5, 4, 3), 2, 0.5) == pytest.approx((1.375, -0.25, -0.125))
    coef = EOCConfig(mode="hicache", order=2).coefficients(6, (5, 4, 3))
    assert coef == pytest.approx((0.0, 0.375, 0.0, 0.125))
    assert eoc_kernels.reference.history_weights([coef[1], coef[3]]) == pytest.approx((1.375, -0.25, -0.125))


@pytest.mark.parametrize("mode", ["taylorseer", "hicache"])
def test_the_ring_holds_only_what_is_read(model, inputs, mode):
    for order in (1, 2, 3):
        with apply_eoc(model, TaylorSeerSchedule(2), config=EOCConfig(mode=mode, order=order)) as handle:
            DDIMSampler(STEPS).sample(model, *inputs, cfg_scale=2.0)
            assert handle.plan.num_generations == order + 1 and handle.cache.buffer.shape[0] == order + 1
    # Three computed steps (0, 1, 5) before the last reuse: order 3 reads C_0..C_2, the ring holds 3.
    mask = torch.zeros(7, len(model.blocks), 2, dtype=torch.bool)
    mask[[0, 1, 5]] = True
    with apply_eoc(model, MaskSchedule(mask), config=EOCConfig(mode=mode, order=3)) as handle:
        DDIMSampler(7).sample(model, *inputs, cfg_scale=2.0)
        assert handle.plan.num_generations == 3 and handle.cache.buffer.shape[0] == 3
    with apply_eoc(model, FORASchedule(2), config=None) as handle:  # plain reuse: one generation
        DDIMSampler(STEPS).sample(model, *inputs, cfg_scale=2.0)
        assert handle.cache.buffer.shape[0] == 1


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(mode="taylorseer", order=0), ValueError, "order must be in 1..3"),
    (dict(mode="taylorseer", order=4), ValueError, "order must be in 1..3"),
    (dict(mode="hicache", order=1.0), TypeError, "order must be an int"),
    (dict(mode="taylorseer", order=True), TypeError, "order must be an int"),
    (dict(mode="extrapolate", order=2), ValueError, "order has no meaning in mode 'extrapolate'"),
    (dict(mode="calibrated", order=2), ValueError, "order has no meaning"),
    (dict(mode="taylorseer", sigma=0.5), ValueError, "sigma has no meaning in mode 'taylorseer'"),
    (dict(mode="hicache", sigma=0.0), ValueError, "sigma must be > 0"),
    (dict(mode="hicache", sigma=-1.0), ValueError, "sigma must be > 0"),
    (dict(mode="hicache", sigma=float("inf")), TypeError, "sigma must be a finite number"),
    (dict(mode="hicache", sigma="0.5"), TypeError, "sigma"),
    (dict(mode="taylorseer", theta=1.0), ValueError, "theta has no meaning in mode 'taylorseer'"),
])
def test_preset_arguments_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        EOCConfig(**kwargs)


def test_preset_defaults():
    assert EOCConfig(mode="taylorseer").effective_order == 1 and EOCConfig(mode="hicache").effective_sigma == 0.5
    assert EOCConfig(mode="hicache", order=3).max_history == 3 and EOCConfig(mode="extrapolate").max_history == 1
    with pytest.raises(ValueError, match="no sigma"):
        _ = EOCConfig(mode="taylorseer").effective_sigma
    with pytest.raises(ValueError, match="no preset coefficients"):
        EOCConfig().coefficients(3, (2,))
