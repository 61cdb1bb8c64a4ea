"""apply_eoc / remove_eoc on diffusers' DiTTransformer2DModel and PixArtTransformer2DModel
(docs/DESIGN.md §4.9): bit-identity, exact removal, reuse of every branch against hand-written caches,
the hook registry shared with diffusers' own hooks, and the errors for what is not supported."""

import subprocess
import sys

import pytest
import torch
from diffusers import Transformer2DModel
from diffusers.hooks import HookRegistry, ModelHook

from eoc_dit import EOCConfig, FORASchedule, MaskSchedule, apply_eoc, remove_eoc
from eoc_dit.diffusers_adapters import DiffusersAdapter
from eoc_dit.errors import InputTypeError, InputValueError
from tests.eoc_dit.diffusers_tiny import dit_inputs, pixart_inputs, tiny_dit, tiny_pixart

TIMESTEPS = (900, 700, 500, 300)


def make(kind):
    if kind == "dit":
        return tiny_dit()
    if kind == "dit-own-embeddings":  # every block its own timestep/class embedding: no stacked gate rows
        return tiny_dit(shared_embedding=False)
    return tiny_pixart()


def call(model, x, t, kind):
    """One forward at timestep ``t`` on tokens ``x``; the other inputs fixed."""
    if kind == "pixart":
        inputs = pixart_inputs()
        inputs.update(hidden_states=x, timestep=torch.full((x.shape[0],), t))
        return model(**inputs).sample
    _, _, labels = dit_inputs()
    return model(x, timestep=torch.full((x.shape[0],), t), class_labels=labels).sample


def run(model, kind, timesteps=TIMESTEPS):
    """A small sampling-like loop (x <- x - 0.1 * eps); every step's output."""
    x = dit_inputs()[0]
    outputs = []
    with torch.no_grad():
        for t in timesteps:
            out = call(model, x, t, kind)
            outputs.append(out)
            x = x - 0.1 * out[:, :1]
    return outputs


def count_computes(model):
    """A counter of real computations of the last block's MLP (only a computed branch calls ff.net[0])."""
    counter = [0]
    model.transformer_blocks[-1].ff.net[0].register_forward_pre_hook(
        lambda module, inputs: counter.__setitem__(0, counter[0] + 1))
    return counter


KINDS = ["dit", "dit-own-embeddings", "pixart"]


@pytest.mark.parametrize("kind", KINDS)
def test_all_compute_schedule_is_bit_identical_and_remove_restores_exactly(kind):
    model = make(kind)
    reference = run(model, kind)
    with apply_eoc(model, FORASchedule(1)) as handle:
        assert isinstance(handle.adapter, DiffusersAdapter)
        patched = run(model, kind)
    for a, b in zip(reference, patched):
        assert torch.equal(a, b)
    # Removed: no trace on the model or its blocks, and the same outputs again.
    for module in [model, *model.transformer_blocks]:
        assert "forward" not in module.__dict__ and not hasattr(module, "_diffusers_hook")
    assert not hasattr(model, "_eoc_handle")
    for a, b in zip(reference, run(model, kind)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_fora_reuses_every_block_at_cached_steps(kind):
    model = make(kind)
    computes = count_computes(model)
    reference = run(model, kind)
    assert computes[0] == len(TIMESTEPS)
    computes[0] = 0
    with apply_eoc(model, FORASchedule(2)):
        cached = run(model, kind)
    assert computes[0] == 2  # steps 0 and 2
    assert torch.equal(cached[0], reference[0])  # step 0 computes everything
    assert not torch.allclose(cached[1], reference[1])  # step 1 reused
    assert torch.isfinite(torch.stack(cached)).all()


def test_units_pixart_has_attn2_as_a_branch_dit_does_not():
    dit_adapter, pixart_adapter = DiffusersAdapter(tiny_dit()), DiffusersAdapter(tiny_pixart())
    assert [u.branches for u in dit_adapter.units] == [("attn1", "ff")] * 2
    assert [u.branches for u in pixart_adapter.units] == [("attn1", "attn2"), ("ff", "empty")] * 2
    assert dit_adapter.shared_embedding and not DiffusersAdapter(tiny_dit(shared_embedding=False)).shared_embedding


class _ReplayOutput:
    """A forward hook on one submodule: records its output at the first call, returns that output at the second."""

    def __init__(self, module):
        self.saved = None
        module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        if self.saved is None:
            self.saved = output.clone()
            return output
        return self.saved


# (kind, block, submodule, unit index, branch in the unit)
REUSED_BRANCHES = [("dit", 0, "attn1", 0, 0), ("dit", 1, "ff", 1, 1), ("pixart", 0, "attn1", 0, 0),
                   ("pixart", 0, "attn2", 0, 1), ("pixart", 1, "ff", 3, 0)]


@pytest.mark.parametrize("kind, block, submodule, unit, branch", REUSED_BRANCHES)
def test_one_reused_branch_equals_a_hand_written_cache(kind, block, submodule, unit, branch):
    model = make(kind)
    num_units = len(DiffusersAdapter(model).units)
    mask = torch.ones(2, num_units, 2, dtype=torch.bool)
    mask[1, unit, branch] = False  # step 1 reuses this one branch (cached_branch), all else computes
    with apply_eoc(model, MaskSchedule(mask)):
        cached = run(model, kind, TIMESTEPS[:2])
    # The reference: the unpatched model whose branch module returns its step-0 output at step 1.
    _ReplayOutput(getattr(model.transformer_blocks[block], submodule))
    by_hand = run(model, kind, TIMESTEPS[:2])
    assert torch.equal(cached[0], by_hand[0])
    torch.testing.assert_close(cached[1], by_hand[1], rtol=0, atol=1e-6)
    assert not torch.allclose(cached[1], run(make(kind), kind, TIMESTEPS[:2])[1])  # the reuse changed something


@pytest.mark.parametrize("kind", KINDS)
def test_extrapolate_preset_runs_fused_and_differs_from_plain(kind):
    model = make(kind)
    with apply_eoc(model, FORASchedule(2)):
        plain = run(model, kind)
    with apply_eoc(model, FORASchedule(2), config=EOCConfig(mode="extrapolate")):
        extrapolated = run(model, kind)
    assert torch.equal(plain[1], extrapolated[1])  # step 1: no compute step before its source (0): plain reuse
    assert not torch.allclose(plain[3], extrapolated[3])  # step 3 extrapolates from steps 0 and 2


class CountingHook(ModelHook):
    """A user's own diffusers hook: counts the forwards it sees."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


@pytest.mark.parametrize("theirs_first", [True, False])
@pytest.mark.parametrize("remove_theirs_first", [True, False])
def test_coexists_with_diffusers_hooks(theirs_first, remove_theirs_first):
    model = tiny_dit()
    reference = run(model, "dit")
    computes = count_computes(model)
    registry = HookRegistry.check_if_exists_or_initialize(model)
    theirs = CountingHook()
    if theirs_first:
        registry.register_hook(theirs, "counting")
    handle = apply_eoc(model, FORASchedule(2))
    if not theirs_first:
        registry.register_hook(theirs, "counting")

    def check(ours: bool, their_calls: int):
        computes[0] = 0
        outputs = run(model, "dit")
        assert computes[0] == (2 if ours else 4)
        assert theirs.calls == their_calls
        return outputs

    check(ours=True, their_calls=4)
    if remove_theirs_first:
        registry.remove_hook("counting")
        check(ours=True, their_calls=4)  # ours survives theirs
        handle.remove()
        outputs = check(ours=False, their_calls=4)
    else:
        handle.remove()
        check(ours=False, their_calls=8)  # theirs survives ours
        registry.remove_hook("counting")
        outputs = check(ours=False, their_calls=8)
    for a, b in zip(reference, outputs):
        assert torch.equal(a, b)


def test_a_second_patch_and_a_taken_hook_name_are_refused():
    model = tiny_dit()
    with apply_eoc(model, FORASchedule(2)):
        with pytest.raises(InputValueError, match="already patched"):
            apply_eoc(model, FORASchedule(3))
    HookRegistry.check_if_exists_or_initialize(model).register_hook(CountingHook(), "eoc")
    with pytest.raises(InputValueError, match="already has a diffusers hook named 'eoc'"):
        apply_eoc(model, FORASchedule(2))


def test_unsupported_model_and_blocks_are_named():
    other = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                               norm_num_groups=1)
    with pytest.raises(InputTypeError, match=r"Transformer2DModel \(blocks: BasicTransformerBlock\).*supported: "
                                             r"DiTTransformer2DModel, PixArtTransformer2DModel"):
        apply_eoc(other, FORASchedule(2))
    model = tiny_dit()
    model.transformer_blocks[1].set_chunk_feed_forward(2)
    with pytest.raises(InputValueError, match=r"transformer_blocks\[1\] \(BasicTransformerBlock.*chunked feed-forward"):
        apply_eoc(model, FORASchedule(2))
    assert "forward" not in model.__dict__  # nothing was installed
    with pytest.raises(InputValueError, match="another model"):
        DiffusersAdapter(tiny_dit()).blocks(model)


def test_remove_eoc_on_an_unpatched_diffusers_model_is_a_no_op():
    model = tiny_dit()
    remove_eoc(model)
    assert not hasattr(model, "_diffusers_hook")


def test_eoc_dit_imports_and_patches_its_own_dit_without_diffusers():
    code = ("import sys, torch; import eoc_dit; from eoc_dit import DiT, FORASchedule, apply_eoc; "
            "m = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=4); "
            "h = apply_eoc(m, FORASchedule(2)); h.remove(); assert 'diffusers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kind", KINDS)
def test_a_cached_fora_step_is_one_fused_segment(kind, monkeypatch):
    import eoc_kernels

    calls = []
    original = eoc_kernels.cached_segment

    def counting(x, gates, cache, *args, **kwargs):
        calls.append(tuple(cache.shape[:3]))  # (G, S, 2)
        return original(x, gates, cache, *args, **kwargs)

    monkeypatch.setattr(eoc_kernels, "cached_segment", counting)
    model = make(kind)
    with apply_eoc(model, FORASchedule(2)) as handle:
        run(model, kind)
        stacked = handle.executor._gate_weight is not None
    num_units = 4 if kind == "pixart" else 2
    assert calls == [(1, num_units, 2)] * 2  # steps 1 and 3: one pass over every unit
    assert stacked == (kind == "dit")  # one gate matmul where the gate input is shared


@pytest.mark.parametrize("kind", ["dit", "dit-own-embeddings"])
def test_conditioning_is_never_served_stale(kind):
    """The embedding and the chunks are computed once per forward / block call: the same timestep tensor with
    other labels, or changed in place, must give what the unpatched model gives."""
    model = make(kind)
    x, t, labels = dit_inputs()
    calls = [(t, labels), (t, labels.flip(0))]

    def outputs():
        results = []
        with torch.no_grad():
            for timestep, y in calls:
                results.append(model(x, timestep=timestep, class_labels=y).sample)
            t.add_(-100)  # in place: a new version of the same tensor
            results.append(model(x, timestep=t, class_labels=labels).sample)
            t.add_(100)
        return results

    reference = outputs()
    with apply_eoc(model, FORASchedule(1)):
        patched = outputs()
    for a, b in zip(reference, patched):
        assert torch.equal(a, b)
