"""torchrun support (docs/DESIGN.md §4.11): a 2-rank gloo run on the CPU gives the prior, the fit and the
samples of a single process; a rank that dies or hangs makes the other fail with a clear error."""

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eoc_dit import DDIMSampler, DDPMSampler, EOCConfig, FORASchedule, apply_eoc, calibrate
from eoc_dit.diffusion import sample_pairs
from eoc_dit.distributed import RankFailure, ordered_sum, shard, shard_bounds
from eoc_dit.errors import InputValueError
from eoc_dit.fitting import fit_coefficients
from eoc_dit.prior import STAT_NAMES
from tests.eoc_dit.tiny import make_tiny_dit

STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_everything() -> dict:
    """Calibrate, fit (with the gain tuned) and sample the tiny DiT; every result as tensors."""
    model, sampler = make_tiny_dit(), DDIMSampler(STEPS)
    prior = calibrate(model, sampler, [0, 1], [1, 2, 3, 4], cfg_scale=2.0, max_gap=2, holdout=0.25, batch_size=1,
                      progress=False)
    fit = fit_coefficients(model, sampler, FORASchedule(2), prior, [0, 1, 2], [5, 6], gains=(0.75, 1.0, 1.25),
                           tune_seeds=[7, 8], progress=False)
    prior.add_fit(fit)
    pairs = [(label, seed) for label in (0, 3) for seed in (11, 12, 13)]
    with torch.no_grad(), apply_eoc(model, FORASchedule(2), prior, EOCConfig()):
        cached = sample_pairs(model, sampler, pairs, cfg_scale=2.0, batch_size=2)
    with torch.no_grad():
        ddpm = sample_pairs(model, DDPMSampler(STEPS), pairs[:4], cfg_scale=1.0, batch_size=1)
    return {"mean": prior.mean, **{f"stat.{k}": v for k, v in prior.stats.items()}, "fit.coef": fit.coef,
            "fit.gain": torch.tensor(fit.info["gain"]), "sample.cached": cached, "sample.ddpm": ddpm}


def _worker(rank, world, port, folder, scenario):
    torch.set_num_threads(1)
    os.environ["EOC_DIST_TIMEOUT_S"] = "6"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=6))
    try:
        if scenario == "die" and rank == 1:
            os._exit(3)  # no clean shutdown: what a crashed or killed rank looks like to the others
        if scenario == "hang" and rank == 1:
            time.sleep(60)
        start = time.perf_counter()
        try:
            result = run_everything()
        except RankFailure as exc:
            result = {"error": str(exc), "seconds": time.perf_counter() - start}
        if rank == 0:
            torch.save(result, os.path.join(folder, "rank0.pt"))
    finally:
        if scenario == "equal":
            dist.destroy_process_group()


def _spawn(world, folder, scenario, wait_s=120):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, world, port, folder, scenario)) for rank in range(world)]
    for p in procs:
        p.start()
    procs[0].join(wait_s)
    for p in procs[1:]:
        p.join(1 if scenario != "equal" else wait_s)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    return procs[0].exitcode, alive


def test_two_gloo_ranks_give_the_single_process_results(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same kernels
    try:
        single = run_everything()
    finally:
        torch.set_num_threads(threads)
    code, alive = _spawn(2, tmp_path, "equal")
    assert code == 0 and not alive
    ranks = torch.load(tmp_path / "rank0.pt")
    lines = []
    for name, ref in single.items():
        got = ranks[name]
        assert got.shape == ref.shape and got.dtype == ref.dtype, name
        finite = ref.isfinite()
        assert torch.equal(finite, got.isfinite()), name  # NaN exactly where a gap reaches before step 0
        diff = float((got[finite].double() - ref[finite].double()).abs().max()) if finite.any() else 0.0
        scale = float(ref[finite].double().abs().max()) if finite.any() else 0.0
        identical = torch.equal(got.nan_to_num(), ref.nan_to_num())
        relative = diff / max(scale, 1e-300)
        lines.append(f"{name:20s} {list(ref.shape)!s:28s} max|diff| {diff:.3g} (relative {relative:.3g})"
                     f"{'  bit-identical' if identical else ''}")
        assert diff <= 1e-6 * scale, name
    print("\n2 gloo ranks vs 1 process:\n" + "\n".join(lines))
    assert set(STAT_NAMES) <= {n.removeprefix("stat.") for n in single}


@pytest.mark.parametrize("scenario", ["die", "hang"])
def test_a_rank_that_dies_or_hangs_fails_the_other_within_the_timeout(tmp_path, scenario):
    start = time.perf_counter()
    code, _ = _spawn(2, tmp_path, scenario, wait_s=60)
    assert time.perf_counter() - start < 60
    assert code == 0  # rank 0 caught the failure and reported it
    result = torch.load(tmp_path / "rank0.pt")
    assert "error" in result, "rank 0 finished although rank 1 never took part"
    assert "another rank stopped or did not answer within 6 s" in result["error"] and "rank 0" in result["error"]
    assert result["seconds"] < 40


def test_shards_are_contiguous_and_cover_the_list():
    for total in range(1, 12):
        for size in range(1, total + 1):
            bounds = [shard_bounds(total, r, size) for r in range(size)]
            assert bounds[0][0] == 0 and bounds[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
    assert shard([1, 2, 3]) == [1, 2, 3]  # one process: everything
    x = torch.arange(3.0)
    assert ordered_sum(x) is x


def test_too_few_items_for_the_ranks_is_an_input_error(monkeypatch):
    import eoc_dit.distributed as distributed

    monkeypatch.setattr(distributed, "rank_and_size", lambda group=None: (0, 4))
    with pytest.raises(InputValueError, match="3 batches of 2 pairs cannot be shared among 4 ranks"):
        distributed.shard([1, 2, 3], what="batches of 2 pairs")


def test_eoc_sample_under_torchrun_writes_the_single_process_samples(tmp_path):
    import subprocess
    import sys

    import numpy as np

    from eoc_dit.cli import main
    from eoc_dit.sample_files import parts_folder, to_uint8_images

    common = ["sample", "--model", "DiT-S/8", "--input-size", "16", "--in-channels", "1", "--num-classes", "4",
              "--steps", "3", "--cfg-scale", "2", "--labels", "0-2", "--seeds", "1-3", "--batch-size", "2",
              "--schedule", "fora:2", "--mode", "extrapolate"]
    env = dict(os.environ, OMP_NUM_THREADS="1", EOC_DIST_TIMEOUT_S="60")
    two = tmp_path / "two.npz"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "eoc_dit.cli", *common, "--out", os.fspath(two)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("9 samples") == 1  # rank 0 alone prints
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*common, "--out", os.fspath(tmp_path / "one.npy")]) == 0
        merged = np.load(two)["arr_0"]
        one = np.load(tmp_path / "one.npy")
        assert one.shape == (9, 1, 16, 16) and np.array_equal(merged, to_uint8_images(torch.from_numpy(one)))
        # resume in one process what 2 ranks began: the same array
        folder = parts_folder(os.fspath(two))
        for name in sorted(n for n in os.listdir(folder) if n.startswith("batch-"))[::2]:
            os.remove(os.path.join(folder, name))
        os.remove(two)
        assert main([*common, "--out", os.fspath(two)]) == 0
        assert np.array_equal(np.load(two)["arr_0"], merged)
    finally:
        torch.set_num_threads(threads)
