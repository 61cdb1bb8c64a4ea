"""The testbed's data reader, training scripts and metrics, on small synthetic data."""

import gzip
import math
import struct

import numpy as np
import pytest
import torch

from eoc_dit.testbed import classifier_accuracy, fd, image_psnrs, psnr
from eoc_dit.testbed.classifier import FashionCNN, frechet_distance, train_classifier
from eoc_dit.testbed.data import load_fashion_mnist, read_idx
from eoc_dit.testbed.train import TrainConfig, train_testbed


def write_idx(path, array, compress=True):
    array = np.asarray(array, dtype=np.uint8)
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(payload)


@pytest.fixture
def fake_dataset(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 12)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    monkeypatch.setenv("EOC_FASHION_MNIST", str(tmp_path))
    return tmp_path


def test_read_idx_round_trip(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for compress in (True, False):
        path = tmp_path / ("a.gz" if compress else "a")
        write_idx(path, array, compress)
        assert np.array_equal(read_idx(str(path)), array)


def test_read_idx_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        read_idx(str(tmp_path / "missing.gz"))
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(str(tmp_path / "bad"))
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(ValueError, match="does not match shape"):
        read_idx(str(tmp_path / "short"))


def test_load_fashion_mnist_scales_to_unit_range(fake_dataset):
    images, labels = load_fashion_mnist("train")
    assert images.shape == (40, 1, 28, 28) and labels.shape == (40,) and labels.dtype == torch.int64
    raw = read_idx(str(fake_dataset / "train-images-idx3-ubyte.gz"))
    torch.testing.assert_close(images[:, 0], torch.from_numpy(raw.astype(np.float32)) / 127.5 - 1)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation")


def test_train_testbed_is_seeded_and_writes_a_loadable_checkpoint(tmp_path):
    images = torch.rand(32, 1, 28, 28) * 2 - 1
    labels = torch.randint(0, 10, (32,))
    config = TrainConfig(hidden_size=32, depth=2, num_heads=2, iterations=3, batch_size=8, warmup=1)
    cards, states = [], []
    for run in ("a", "b"):
        out = tmp_path / run
        out.mkdir()
        cards.append(train_testbed(config, str(out), images=images, labels=labels, progress=False))
        states.append(torch.load(out / "testbed_dit.pt", weights_only=True))
    assert cards[0]["iterations_run"] == 3 and cards[0]["config"]["depth"] == 2
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # same seed, same weights
    model = config.build_model()
    model.load_state_dict({k: v.float() for k, v in states[0].items()})
    with pytest.raises(ValueError, match="writable folder"):
        train_testbed(config, str(tmp_path / "nowhere"), images=images, labels=labels, progress=False)


def test_a_resumed_training_run_equals_an_uninterrupted_one(tmp_path):
    """3 iterations, stop, resume to 7: the same weights, EMA, optimizer state and loss curve as 7 in one
    go (across the warm-up's end, a reshuffle of the data order and the label dropout's random draws)."""
    images = torch.rand(32, 1, 28, 28) * 2 - 1
    labels = torch.randint(0, 10, (32,))
    settings = dict(hidden_size=32, depth=1, num_heads=2, batch_size=8, warmup=2)
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir()
    split.mkdir()
    card = train_testbed(TrainConfig(iterations=7, **settings), str(straight), images=images, labels=labels,
                         progress=False, checkpoint_every=7)
    train_testbed(TrainConfig(iterations=3, **settings), str(split), images=images, labels=labels, progress=False,
                  checkpoint_every=3)
    resumed = train_testbed(TrainConfig(iterations=7, **settings), str(split), images=images, labels=labels,
                            progress=False, resume=True, checkpoint_every=2)
    assert resumed["iterations_run"] == card["iterations_run"] == 7 and resumed["resumed_from_iteration"] == 3
    a = torch.load(straight / "train_state.pt", weights_only=True)
    b = torch.load(split / "train_state.pt", weights_only=True)
    assert a["next_step"] == b["next_step"] == 7 and a["losses"] == b["losses"]
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    moments = [(x["exp_avg"], y["exp_avg"]) for x, y in zip(a["optimizer"]["state"].values(),
                                                           b["optimizer"]["state"].values())]
    assert moments and all(torch.equal(x, y) for x, y in moments)
    weights = [torch.load(folder / "testbed_dit.pt", weights_only=True) for folder in (straight, split)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_resume_refuses_another_run_or_a_missing_state(tmp_path):
    images = torch.rand(16, 1, 28, 28) * 2 - 1
    labels = torch.randint(0, 10, (16,))
    config = TrainConfig(hidden_size=32, depth=1, num_heads=2, iterations=2, batch_size=8, warmup=1)
    with pytest.raises(ValueError, match="cannot resume: .*train_state.pt does not exist"):
        train_testbed(config, str(tmp_path), images=images, labels=labels, progress=False, resume=True)
    train_testbed(config, str(tmp_path), images=images, labels=labels, progress=False, checkpoint_every=1)
    other = TrainConfig(hidden_size=32, depth=1, num_heads=2, iterations=4, batch_size=8, warmup=1, lr=1e-3)
    with pytest.raises(ValueError, match=r"other settings lr=0.0003 \(now 0.001\)"):
        train_testbed(other, str(tmp_path), images=images, labels=labels, progress=False, resume=True)
    shorter = TrainConfig(hidden_size=32, depth=1, num_heads=2, iterations=1, batch_size=8, warmup=1)
    with pytest.raises(ValueError, match="already ran 2 iterations"):
        train_testbed(shorter, str(tmp_path), images=images, labels=labels, progress=False, resume=True)
    with pytest.raises(ValueError, match="checkpoint_every must be an int >= 0"):
        train_testbed(config, str(tmp_path), images=images, labels=labels, progress=False, checkpoint_every=-1)


def test_train_classifier_writes_weights_and_statistics(tmp_path):
    train = (torch.rand(64, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (64,)))
    test = (torch.rand(16, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (16,)))
    card = train_classifier(str(tmp_path), epochs=1, batch_size=32, progress=False, data=(train, test))
    assert 0.0 <= card["test_accuracy"] <= 1.0
    stats = torch.load(tmp_path / "test_feature_stats.pt", weights_only=True)
    assert stats["mean"].shape == (128,) and stats["cov"].shape == (128, 128) and stats["num_images"] == 16
    model = FashionCNN()
    model.load_state_dict(torch.load(tmp_path / "classifier.pt", weights_only=True))


def test_frechet_distance_matches_the_gaussian_formula():
    # Diagonal covariances: FD = ||μa − μb||² + Σ (σa − σb)².
    mean_a, mean_b = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    var_a, var_b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 4.0, 1.0])
    expected = 1 + 4 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2
    assert frechet_distance(mean_a, torch.diag(var_a), mean_b, torch.diag(var_b)) == pytest.approx(expected)
    # Invariant to a rotation of both sets, zero against itself.
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    cov = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 1.5]], dtype=torch.float64)
    assert frechet_distance(mean_a, cov, mean_a, cov) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(q @ mean_a.double(), q @ cov @ q.T,
                            q @ mean_b.double(), q @ torch.diag(var_b).double() @ q.T) == \
        pytest.approx(frechet_distance(mean_a, cov, mean_b, torch.diag(var_b)))


def test_psnr_values():
    reference = torch.rand(3, 1, 28, 28) * 1.6 - 0.8
    assert psnr(reference + 0.1, reference) == pytest.approx(10 * math.log10(4 / 0.01), rel=1e-4)
    assert psnr(reference, reference) == 100.0
    with pytest.raises(ValueError, match="same shape"):
        psnr(reference[:2], reference)
    with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
        psnr(torch.zeros(2, 3, 28, 28), torch.zeros(2, 3, 28, 28))


def test_psnr_is_pooled_not_a_mean_of_images():
    """One exact image and one off by 0.2 everywhere: pooled MSE 0.02 (20.0 dB), while the mean of
    per-image PSNRs would be (100 + 20.0) / 2 = 60 dB; per-image values keep each image's own MSE."""
    reference = torch.zeros(2, 1, 28, 28)
    images = reference.clone()
    images[1] += 0.2
    assert psnr(images, reference) == pytest.approx(10 * math.log10(4 / 0.02))
    per_image = image_psnrs(images, reference)
    assert per_image.tolist() == pytest.approx([100.0, 10 * math.log10(4 / 0.04)])
    # clamped to [-1, 1] before the error: an excursion beyond the range is invisible
    assert psnr(torch.full((1, 1, 28, 28), 3.0), torch.ones(1, 1, 28, 28)) == 100.0


def test_metric_input_checks():
    with pytest.raises(TypeError, match="images"):
        classifier_accuracy(torch.zeros(2, 1, 28, 28, dtype=torch.long), torch.zeros(2))
    with pytest.raises(ValueError, match="images_a contains NaN or inf"):
        fd(torch.full((2, 1, 28, 28), float("nan")), torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match="reference contains NaN or inf"):
        psnr(torch.zeros(2, 1, 28, 28), torch.full((2, 1, 28, 28), float("inf")))


def test_frechet_distance_of_a_rank_deficient_set_is_finite():
    # Identical feature sets with a singular covariance (fewer samples than dimensions): FD 0, no solver failure.
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(5, 128, generator=gen).double()
    mean, cov = feats.mean(0), torch.cov(feats.T)
    assert frechet_distance(mean, cov, mean, cov) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(mean, cov, mean + 1.0, cov) == pytest.approx(128.0, rel=1e-6)


@pytest.mark.parametrize("field,value", [("iterations", 0), ("batch_size", -1), ("lr", math.nan), ("max_minutes", -1.0),
                                         ("ema_decay", 1.5), ("seed", 1.5)])
def test_train_config_refuses_bad_values(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("kwargs,needle", [(dict(epochs=0), "epochs"), (dict(batch_size=0), "batch_size"),
                                           (dict(lr=math.inf), "lr")])
def test_train_classifier_refuses_bad_values(tmp_path, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        train_classifier(str(tmp_path), progress=False, data=((None, None), (None, None)), **kwargs)
    assert not list(tmp_path.iterdir())


def test_noise_for_seed_refuses_seeds_torch_cannot_take(tiny_dit):
    from eoc_dit import noise_for_seed

    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="seed must lie"):
            noise_for_seed(tiny_dit, seed)
    with pytest.raises(TypeError, match="seed must be an int"):
        noise_for_seed(tiny_dit, 1.0)


def test_evaluate_refuses_a_bad_batch_size():
    from eoc_dit.testbed.demo import evaluate, methods_for

    with pytest.raises(ValueError, match="batch_size"):
        evaluate(methods_for([2], []), 4, batch_size=0, progress=False)


def test_a_warm_start_begins_from_the_given_weights_and_records_their_card(tmp_path):
    """init_from loads the checkpoint into the weights and the EMA (with ema_start=0 the EMA averages from the
    first iteration); the card carries the card beside the checkpoint; another architecture is refused."""
    images = torch.rand(16, 1, 28, 28) * 2 - 1
    labels = torch.randint(0, 10, (16,))
    settings = dict(hidden_size=32, depth=1, num_heads=2, batch_size=8, warmup=1)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    train_testbed(TrainConfig(iterations=2, **settings), str(first), images=images, labels=labels, progress=False)
    start = torch.load(first / "testbed_dit.pt", weights_only=True)
    config = TrainConfig(iterations=1, lr=0.0, ema_start=0, init_from=str(first / "testbed_dit.pt"), **settings)
    card = train_testbed(config, str(second), images=images, labels=labels, progress=False)
    after = torch.load(second / "testbed_dit.pt", weights_only=True)
    # lr 0: the weights do not move, so the EMA of the loaded weights is the loaded weights (fp16 round trip)
    assert all(torch.equal(after[k], start[k]) for k in start)
    assert card["init_from_card"]["iterations_run"] == 2 and card["config"]["ema_start"] == 0
    fresh = train_testbed(TrainConfig(iterations=1, lr=0.0, ema_start=0, **settings), str(first), images=images,
                          labels=labels, progress=False)
    assert fresh["init_from_card"] is None
    wider = TrainConfig(iterations=1, hidden_size=64, depth=1, num_heads=2, batch_size=8,
                        init_from=str(second / "testbed_dit.pt"))
    with pytest.raises(ValueError, match="not a checkpoint of this architecture"):
        train_testbed(wider, str(tmp_path), images=images, labels=labels, progress=False)
    with pytest.raises(ValueError, match="init_from: .* is not a file"):
        train_testbed(TrainConfig(init_from=str(tmp_path / "missing.pt"), **settings), str(tmp_path), images=images,
                      labels=labels, progress=False)
    with pytest.raises(ValueError, match="ema_start must be an int >= 0"):
        TrainConfig(ema_start=-1)


def test_sample_accuracy_of_a_trained_folder_counts_each_class(tmp_path, monkeypatch):
    """load_model_from reads what train_testbed wrote; sample_accuracy classifies the samples per class (the
    classifier is replaced by one that answers from the image's mean pixel, so the expected hits are known)."""
    import eoc_dit.testbed as tb

    images = torch.rand(16, 1, 28, 28) * 2 - 1
    labels = torch.randint(0, 10, (16,))
    train_testbed(TrainConfig(hidden_size=32, depth=1, num_heads=2, iterations=1, batch_size=8, warmup=1),
                  str(tmp_path), images=images, labels=labels, progress=False)
    model = tb.load_model_from(str(tmp_path))

    class Answers(torch.nn.Module):  # predicts class 3 for every image
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((x.shape[0],), 3), 10).float()

    monkeypatch.setattr(tb, "_classifier", lambda: Answers())
    result = tb.sample_accuracy(model, 20, num_steps=2, batch_size=7)
    assert result["per_class"]["Dress"] == 1.0 and result["overall"] == 0.1
    assert sum(result["per_class"].values()) == 1.0 and len(result["mean_pixel_per_class"]) == 10
    assert all(-1.0 <= v <= 1.0 for v in result["mean_pixel_per_class"].values())
    with pytest.raises(ValueError, match="num_samples must be an int >= the number of classes"):
        tb.sample_accuracy(model, 5)
    with pytest.raises(FileNotFoundError, match="MODEL_CARD.json does not exist"):
        tb.load_model_from(str(tmp_path / "elsewhere"))


@pytest.mark.parametrize("text", ["5", "5:0", "5:-1", "10:2", "-1:2", "a:2", "5:nan", "5:2,5:3", "5:inf"])
def test_train_config_refuses_bad_class_weights(text):
    with pytest.raises(ValueError, match="TrainConfig.class_weights"):
        TrainConfig(class_weights=text)


def test_class_weights_draw_the_listed_label_that_much_more_often(tmp_path):
    images = torch.rand(40, 1, 28, 28) * 2 - 1
    labels = torch.tensor([3] * 4 + [0] * 36)
    settings = dict(hidden_size=32, depth=1, num_heads=2, iterations=1, batch_size=8, warmup=1)
    orders = {}
    for name, weights in (("plain", ""), ("weighted", " 3:50 ,")):
        out = tmp_path / name
        out.mkdir()
        card = train_testbed(TrainConfig(class_weights=weights, **settings), str(out), images=images, labels=labels,
                             progress=False, checkpoint_every=1)
        assert card["config"]["class_weights"] == weights
        orders[name] = torch.load(out / "train_state.pt", weights_only=True)["order"]
    assert torch.equal(orders["plain"].sort().values, torch.arange(40))  # unweighted: a permutation, as before
    share = (labels[orders["weighted"]] == 3).double().mean().item()
    assert 0.7 < share <= 1.0  # expected 200 / 236 = 0.85 of the draws, against 0.1 without the weights


def test_a_state_saved_before_class_weights_resumes_as_unweighted(tmp_path):
    images = torch.rand(32, 1, 28, 28) * 2 - 1
    labels = torch.randint(0, 10, (32,))
    settings = dict(hidden_size=32, depth=1, num_heads=2, batch_size=8, warmup=1)
    train_testbed(TrainConfig(iterations=2, **settings), str(tmp_path), images=images, labels=labels, progress=False,
                  checkpoint_every=2)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    del state["config"]["class_weights"]  # as written by the code before the field existed
    torch.save(state, tmp_path / "train_state.pt")
    with pytest.raises(ValueError, match=r"class_weights=''.*now '5:3'"):
        train_testbed(TrainConfig(iterations=3, class_weights="5:3", **settings), str(tmp_path), images=images,
                      labels=labels, progress=False, resume=True)
    card = train_testbed(TrainConfig(iterations=3, **settings), str(tmp_path), images=images, labels=labels,
                         progress=False, resume=True)
    assert card["iterations_run"] == 3 and card["resumed_from_iteration"] == 2


def test_a_resumed_class_weighted_run_equals_an_uninterrupted_one(tmp_path):
    images = torch.rand(32, 1, 28, 28) * 2 - 1
    labels = torch.randint(0, 10, (32,))
    settings = dict(hidden_size=32, depth=1, num_heads=2, batch_size=8, warmup=1, class_weights="2:4,7:0.5")
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir()
    split.mkdir()
    train_testbed(TrainConfig(iterations=6, **settings), str(straight), images=images, labels=labels, progress=False)
    train_testbed(TrainConfig(iterations=3, **settings), str(split), images=images, labels=labels, progress=False,
                  checkpoint_every=3)
    train_testbed(TrainConfig(iterations=6, **settings), str(split), images=images, labels=labels, progress=False,
                  resume=True)  # 6 iterations of 8 cross the epoch of 32: a second weighted draw
    weights = [torch.load(folder / "testbed_dit.pt", weights_only=True) for folder in (straight, split)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
