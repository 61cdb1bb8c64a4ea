"""The DiT re-implementation: checkpoint-compatible names and shapes, the DiT initialization, the forward
contract, CFG, input checks and ``load_dit``."""

import argparse
import math

import pytest
import torch

from eoc_dit.models import (
    DIT_CONFIGS,
    Attention,
    DiT,
    DiT_models,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    load_dit,
)

# The count the original DiT release reports for DiT-XL/2 (pos_embed included).
DIT_XL_2_PARAMS = 675_129_632

BLOCK_SHAPES = {  # per block, hidden size C: name -> shape
    "attn.qkv.weight": lambda C: [3 * C, C],
    "attn.qkv.bias": lambda C: [3 * C],
    "attn.proj.weight": lambda C: [C, C],
    "attn.proj.bias": lambda C: [C],
    "mlp.fc1.weight": lambda C: [4 * C, C],
    "mlp.fc1.bias": lambda C: [4 * C],
    "mlp.fc2.weight": lambda C: [C, 4 * C],
    "mlp.fc2.bias": lambda C: [C],
    "adaLN_modulation.1.weight": lambda C: [6 * C, C],
    "adaLN_modulation.1.bias": lambda C: [6 * C],
}


def randomize(model, seed=0):
    """Replace the zero-initialized weights (pos_embed kept) so outputs are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "pos_embed":
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model


def random_dit(randomize_weights=True, **kwargs):
    """A 2-block DiT with hidden size 64 on 8x8 latents (16 tokens): fast forward tests."""
    torch.manual_seed(0)
    config = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    config.update(kwargs)
    model = DiT(**config).eval()
    return randomize(model) if randomize_weights else model


@pytest.fixture(scope="module")
def s8_model():
    """A randomized DiT-S/8 on 16x16 latents with 10 classes (the smallest real config: 33M parameters)."""
    return randomize(DiT_models["DiT-S/8"](input_size=16, num_classes=10).eval())


@pytest.fixture(scope="module")
def s8_checkpoint(s8_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("checkpoints") / "dit-s-8.pt"
    torch.save(s8_model.state_dict(), path)
    return path


def inputs(model, batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = torch.randint(0, model.num_classes + 1, (batch,), generator=gen)
    return x, t, y


# --------------------------------------------------------------------------------------------------
# Names, shapes, configs
# --------------------------------------------------------------------------------------------------


def test_dit_xl_2_state_dict_matches_original():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32, num_classes=1000, learn_sigma=True)
    shapes = {key: list(value.shape) for key, value in model.state_dict().items()}
    C = 1152
    expected = {
        "pos_embed": [1, 256, C],
        "x_embedder.proj.weight": [C, 4, 2, 2],
        "x_embedder.proj.bias": [C],
        "t_embedder.mlp.0.weight": [C, 256],
        "t_embedder.mlp.0.bias": [C],
        "t_embedder.mlp.2.weight": [C, C],
        "t_embedder.mlp.2.bias": [C],
        "y_embedder.embedding_table.weight": [1001, C],
        "final_layer.linear.weight": [32, C],
        "final_layer.linear.bias": [32],
        "final_layer.adaLN_modulation.1.weight": [2 * C, C],
        "final_layer.adaLN_modulation.1.bias": [2 * C],
    }
    for i in range(28):
        expected.update({f"blocks.{i}.{name}": shape(C) for name, shape in BLOCK_SHAPES.items()})
    assert shapes == expected
    assert shapes["blocks.27.adaLN_modulation.1.weight"] == [6912, 1152]
    assert sum(p.numel() for p in model.parameters()) == DIT_XL_2_PARAMS
    assert not model.pos_embed.requires_grad
    assert (model.depth, model.hidden_size, model.num_tokens, model.out_channels) == (28, 1152, 256, 8)


@pytest.mark.parametrize("name", list(DiT_models))
def test_all_configs_construct(name):
    size, patch = name[len("DiT-") :].split("/")
    depth, hidden, heads = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}[size]
    with torch.device("meta"):
        model = DiT_models[name](input_size=32, num_classes=1000)
    assert len(model.blocks) == model.depth == depth
    assert model.hidden_size == hidden and model.num_heads == heads
    assert model.patch_size == int(patch) and model.x_embedder.proj.kernel_size == (int(patch),) * 2
    assert model.num_tokens == (32 // int(patch)) ** 2
    assert DIT_CONFIGS[name] == dict(depth=depth, hidden_size=hidden, patch_size=int(patch), num_heads=heads)


def test_twelve_configs_in_original_order():
    assert list(DiT_models) == [f"DiT-{s}/{p}" for s in ("XL", "L", "B", "S") for p in (2, 4, 8)]


def test_fixed_embeddings_follow_dit_formulas():
    pos = get_2d_sincos_pos_embed(8, 3)  # [9, 8]: w-coordinate in the first half, h in the second
    # token 1 is (h=0, w=1); each half is cat([sin(pos * omega), cos(pos * omega)]) with omega = [1, 1e-2]
    expected = [math.sin(1), math.sin(1e-2), math.cos(1), math.cos(1e-2), 0.0, 0.0, 1.0, 1.0]
    assert pos.shape == (9, 8)
    assert pos[1].tolist() == pytest.approx(expected, abs=1e-12)
    assert pos[3, 4] == pytest.approx(math.sin(1))  # token 3 is (h=1, w=0)

    t = torch.tensor([0.0, 7.5])
    emb = TimestepEmbedder.timestep_embedding(t, 256)
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    assert torch.equal(emb, torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=-1))


# --------------------------------------------------------------------------------------------------
# Initialization and forward
# --------------------------------------------------------------------------------------------------


def test_fresh_model_blocks_are_identity_and_output_is_zero():
    model = random_dit(randomize_weights=False)
    x, t, y = inputs(model)
    tokens = torch.randn(2, model.num_tokens, model.hidden_size)
    c = torch.randn(2, model.hidden_size)
    for block in model.blocks:
        assert torch.equal(block(tokens, c), tokens)
    out = model(x, t, y)
    assert out.shape == (2, 8, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(model.pos_embed[0], torch.from_numpy(get_2d_sincos_pos_embed(64, 4)).float())


@pytest.mark.parametrize("in_channels, learn_sigma, out_channels", [(4, True, 8), (1, False, 1), (3, True, 6)])
def test_forward_shape_and_determinism(in_channels, learn_sigma, out_channels):
    model = random_dit(in_channels=in_channels, learn_sigma=learn_sigma, input_size=12)
    x, t, y = inputs(model, batch=3)
    out = model(x, t, y)
    assert out.shape == (3, out_channels, 12, 12)
    assert out.abs().sum() > 0
    assert torch.equal(model(x, t, y), out)
    assert torch.equal(model(x, t.float(), y.int()), out)  # float timesteps and int32 labels are accepted


def test_attention_matches_explicit_softmax_reference():
    torch.manual_seed(0)
    attn = Attention(96, num_heads=6)  # head_dim 16
    x = torch.randn(2, 49, 96, dtype=torch.float64)
    attn = attn.double()
    q, k, v = attn.qkv(x).reshape(2, 49, 3, 6, 16).permute(2, 0, 3, 1, 4)  # each [B, H, N, D]
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(16), dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 49, 96))
    torch.testing.assert_close(attn(x), expected, rtol=1e-10, atol=1e-10)


def test_unpatchify_inverts_patch_layout():
    model = random_dit(input_size=32, patch_size=8, learn_sigma=False)  # grid 4x4, 4 channels
    images = torch.randn(2, 4, 32, 32)
    # [B, C, h, p, w, q] -> [B, h*w, p*q*C]: the layout the final linear produces
    tokens = images.reshape(2, 4, 4, 8, 4, 8).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 8 * 8 * 4)
    assert torch.equal(model.unpatchify(tokens), images)


def test_forward_with_cfg_matches_manual_guidance():
    model = random_dit()
    x, t, _ = inputs(model, batch=4)
    t = torch.cat([t[:2], t[:2]])
    y = torch.tensor([3, 7, model.num_classes, model.num_classes])
    scale = 4.0
    out = model.forward_with_cfg(x, t, y, scale)

    full = model(torch.cat([x[:2], x[:2]]), t, y)
    cond, uncond = full[:2, :4], full[2:, :4]
    guided = uncond + scale * (cond - uncond)
    assert out.shape == full.shape == (4, 8, 8, 8)
    assert torch.equal(out[:, :4], torch.cat([guided, guided]))  # all 4 eps channels are guided
    assert torch.equal(out[:, 4:], full[:, 4:])
    assert not torch.equal(out[:2, :4], cond)


def test_forward_with_cfg_goes_through_self_forward():
    model = random_dit()
    calls = []
    original = model.forward

    def counting_forward(*args):
        calls.append(args[0].shape[0])
        return original(*args)

    model.forward = counting_forward  # an instance-level patch, as the caching code installs
    x, t, y = inputs(model, batch=4)
    model.forward_with_cfg(x, t, y, 1.5)
    assert calls == [4]


def test_label_dropout_uses_null_class():
    model = random_dit()
    y = torch.tensor([1, 2, 3])
    null = model.y_embedder.embedding_table.weight[model.num_classes]
    dropped = model.y_embedder(y, False, force_drop_ids=torch.tensor([1, 0, 1]))
    assert torch.equal(dropped[0], null) and torch.equal(dropped[2], null)
    assert torch.equal(dropped[1], model.y_embedder.embedding_table.weight[2])
    model.y_embedder.dropout_prob = 1.0  # training drops every label
    assert torch.equal(model.y_embedder(y, True), null.expand(3, -1))
    assert torch.equal(model.y_embedder(y, False), model.y_embedder.embedding_table.weight[1:4])


@pytest.mark.parametrize(
    "change, error, argument",
    [
        (lambda x, t, y: (x.long(), t, y), TypeError, "x"),
        (lambda x, t, y: (x[0], t, y), ValueError, "x"),
        (lambda x, t, y: (x[:, :3], t, y), ValueError, "x"),
        (lambda x, t, y: (x[..., :4], t, y), ValueError, "x"),
        (lambda x, t, y: (x, t[:, None], y), ValueError, "t"),
        (lambda x, t, y: (x, t[:1], y), ValueError, "t"),
        (lambda x, t, y: (x, t > 0, y), TypeError, "t"),
        (lambda x, t, y: (x, 5, y), TypeError, "t"),
        (lambda x, t, y: (x, t, y.float()), TypeError, "y"),
        (lambda x, t, y: (x, t, y[:1]), ValueError, "y"),
        (lambda x, t, y: (x, t, y[0]), ValueError, "y"),
    ],
)
def test_forward_rejects_bad_inputs(change, error, argument):
    model = random_dit(randomize_weights=False)
    with pytest.raises(error, match=rf"^{argument} must"):
        model(*change(*inputs(model)))


def test_forward_with_cfg_rejects_odd_batch():
    model = random_dit(randomize_weights=False)
    with pytest.raises(ValueError, match="even batch"):
        model.forward_with_cfg(*inputs(model, batch=3), 4.0)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="input_size"):
        DiT(input_size=30, patch_size=4, hidden_size=64, depth=1, num_heads=4)
    with pytest.raises(ValueError, match="num_heads"):
        DiT(input_size=8, patch_size=2, hidden_size=64, depth=1, num_heads=5)
    for name, value in (("input_size", 0), ("in_channels", 0), ("depth", 0), ("patch_size", 2.0),
                        ("num_classes", True)):
        kwargs = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=1, num_heads=4, num_classes=4)
        kwargs[name] = value
        with pytest.raises(ValueError, match=name):
            DiT(**kwargs)


# --------------------------------------------------------------------------------------------------
# load_dit
# --------------------------------------------------------------------------------------------------


def test_load_dit_round_trip_is_bit_identical(s8_model, s8_checkpoint):
    loaded = load_dit(s8_checkpoint)
    assert isinstance(loaded, DiT) and not loaded.training
    assert (loaded.depth, loaded.hidden_size, loaded.patch_size, loaded.num_heads) == (12, 384, 8, 6)
    assert (loaded.input_size, loaded.num_classes, loaded.in_channels, loaded.learn_sigma) == (16, 10, 4, True)
    assert not loaded.pos_embed.requires_grad
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    x, t, y = inputs(s8_model, batch=3)
    assert torch.equal(loaded(x, t, y), s8_model(x, t, y))
    same = load_dit(str(s8_checkpoint), "DiT-S/8", input_size=16, num_classes=10, learn_sigma=True, in_channels=4)
    assert torch.equal(same(x, t, y), s8_model(x, t, y))


def test_load_dit_training_checkpoint_prefers_ema(s8_model, tmp_path):
    ema = s8_model.state_dict()
    raw = dict(ema, **{"final_layer.linear.bias": ema["final_layer.linear.bias"] + 1})  # shares the rest
    path = tmp_path / "0050000.pt"
    checkpoint = {
        "model": raw,
        "ema": ema,
        "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
        "args": argparse.Namespace(model="DiT-S/8", image_size=128),  # what DiT's train.py saves
    }
    torch.save(checkpoint, path)
    x, t, y = inputs(s8_model)
    expected = s8_model(x, t, y)
    assert torch.equal(load_dit(path)(x, t, y), expected)
    del checkpoint["ema"]
    torch.save(checkpoint, path)
    torch.testing.assert_close(load_dit(path)(x, t, y), expected + 1)  # the 'model' weights, bias + 1


def test_load_dit_infers_other_configs(tmp_path):
    model = DiT_models["DiT-S/8"](in_channels=1, learn_sigma=False, num_classes=3, input_size=32)
    path = tmp_path / "dit.pt"
    torch.save(model.state_dict(), path)
    loaded = load_dit(path)
    assert (loaded.in_channels, loaded.out_channels, loaded.learn_sigma) == (1, 1, False)
    assert (loaded.num_classes, loaded.input_size, loaded.num_tokens) == (3, 32, 16)
    assert loaded(*inputs(loaded)).shape == (2, 1, 32, 32)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(input_size=32), r"input_size=32 .* input_size=16"),
        (dict(num_classes=1000), r"num_classes=1000 .* num_classes=10"),
        (dict(learn_sigma=False), r"learn_sigma=False .* learn_sigma=True"),
        (dict(in_channels=3), r"in_channels=3 .* in_channels=4"),
        (dict(model_name="DiT-B/8"), r"hidden_size=768 .* hidden_size=384"),
        (dict(model_name="DiT-S/4"), r"patch_size=4 .* patch_size=8"),
        (dict(model_name="DiT-Q/8"), r"unknown DiT model"),
    ],
)
def test_load_dit_rejects_contradictions(s8_checkpoint, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_dit(s8_checkpoint, **kwargs)


def test_load_dit_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_dit(path)


@pytest.mark.parametrize("payload", [b"", bytes(range(256)) * 40])
def test_load_dit_corrupt_file(tmp_path, payload):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match="could not read") as info:
        load_dit(path)
    assert "\n" not in str(info.value)


def test_load_dit_rejects_unsafe_pickle(tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"ema": {"pos_embed": torch.zeros(1)}, "extra": ValueError("arbitrary object")}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_dit(path)


def test_load_dit_rejects_non_dit_state_dicts(s8_model, tmp_path):
    path = tmp_path / "other.pt"
    state_dict = s8_model.state_dict()
    cases = {
        "lacks": torch.nn.Linear(3, 4).state_dict(),
        "does not hold a state dict": [torch.zeros(3)],
        "unexpected: blocks.0.attn.extra": {**state_dict, "blocks.0.attn.extra": torch.zeros(1)},
        "missing: blocks.11.mlp.fc2.bias": {k: v for k, v in state_dict.items() if k != "blocks.11.mlp.fc2.bias"},
        "shape mismatch: blocks.3.mlp.fc1.weight": {**state_dict, "blocks.3.mlp.fc1.weight": torch.zeros(1, 384)},
        "square grid": {**state_dict, "pos_embed": torch.zeros(1, 5, 384)},
        "matches none": {k: v for k, v in state_dict.items() if not k.startswith("blocks.11.")},
    }
    for pattern, payload in cases.items():
        torch.save(payload, path)
        with pytest.raises(ValueError, match=pattern) as info:
            load_dit(path)
        assert "\n" not in str(info.value)
