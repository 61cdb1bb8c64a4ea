"""Running under torchrun (docs/DESIGN.md §4.11 "Many GPUs"): the process group, the sharding of
(label, seed) pairs, and reductions whose result does not depend on the number of ranks.

- :func:`init_from_env` starts the default process group when torchrun's environment says so
  (``WORLD_SIZE`` > 1): NCCL for a CUDA device, gloo otherwise, with a timeout
  (``$EOC_DIST_TIMEOUT_S``, default 600 s) so that a rank that dies or hangs makes the others fail
  with :class:`RankFailure` instead of waiting for ever.
- :func:`shard` gives each rank a contiguous slice of a list (sizes differ by at most one, the
  first ranks take the extra items), so rank order is list order.
- :func:`ordered_sum` sums one tensor over the ranks in rank order (one broadcast per rank; every
  rank adds the same tensors in the same order, so all hold the same bits);
  :func:`gather_rows` concatenates per-rank rows [b_r, ...] into [Σ b_r, ...] in rank order, i.e.
  in the order of the sharded list. Callers sum per-sample rows of the gathered tensor in that fixed
  order, or sum fp64 partials whose summands are exact, so a run's result is the same on any
  number of ranks (tests/eoc_dit/test_distributed.py).

Every function takes ``group``: a process group, or None for the default group when one is
initialised, else a single process (the functions are then identities).
"""

from __future__ import annotations

import datetime
import os

import torch

from .errors import InputValueError

DEFAULT_TIMEOUT_S = 600.0


class RankFailure(RuntimeError):
    """A collective failed: another rank stopped, or did not answer within the timeout."""


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() else None


def resolve_group(group=None):
    """``group``, else the default group when one is initialised, else None (one process)."""
    if group is not None:
        return group
    dist = _dist()
    if dist is not None and dist.is_initialized():
        return dist.group.WORLD
    return None


def rank_and_size(group=None) -> tuple[int, int]:
    group = resolve_group(group)
    if group is None:
        return 0, 1
    dist = _dist()
    return dist.get_rank(group), dist.get_world_size(group)


def is_main(group=None) -> bool:
    """Whether this process prints and writes the shared files (rank 0, or a single process)."""
    return rank_and_size(group)[0] == 0


def timeout_s() -> float:
    text = os.environ.get("EOC_DIST_TIMEOUT_S")
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise InputValueError(f"$EOC_DIST_TIMEOUT_S must be a number of seconds > 0, got {text!r}")
    return value


def init_from_env(device: str | torch.device = "cpu") -> bool:
    """Start the default process group if torchrun launched this process with ``WORLD_SIZE`` > 1 and none
    is running; True when a group of several ranks is running after the call. NCCL for a CUDA
    ``device`` (each rank on ``cuda:$LOCAL_RANK``), gloo otherwise."""
    dist = _dist()
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if dist is None or size <= 1:
        return False
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s()))
    return dist.get_world_size() > 1


def shutdown() -> None:
    dist = _dist()
    if dist is not None and dist.is_initialized():
        dist.destroy_process_group()


def shard_bounds(total: int, rank: int, size: int) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s contiguous share of ``total`` items."""
    base, extra = divmod(total, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard(items: list, group=None, *, what: str = "pairs") -> list:
    """This rank's contiguous share of ``items``; InputValueError when some rank would get none."""
    rank, size = rank_and_size(group)
    if len(items) < size:
        raise InputValueError(f"{len(items)} {what} cannot be shared among {size} ranks: every rank needs at least "
                              "one (use more labels or seeds, or fewer ranks)")
    start, stop = shard_bounds(len(items), rank, size)
    return items[start:stop]


def _device(group) -> torch.device:
    dist = _dist()
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _failed(what: str, exc: BaseException) -> RankFailure:
    rank, _ = rank_and_size()
    text = " ".join(str(exc).split())[:300]
    return RankFailure(f"rank {rank}: {what} failed: another rank stopped or did not answer within "
                       f"{timeout_s():g} s ($EOC_DIST_TIMEOUT_S) ({type(exc).__name__}: {text})")


def ordered_sum(tensor: torch.Tensor, group=None, *, what: str = "a sum over the ranks") -> torch.Tensor:
    """Σ_r tensor_r added in rank order (((t_0 + t_1) + t_2) + ...), the same bits on every rank; shape
    and dtype must agree across ranks. One process: ``tensor`` itself."""
    group = resolve_group(group)
    if group is None:
        return tensor
    dist = _dist()
    rank, size = rank_and_size(group)
    device = _device(group)
    mine = tensor.detach().to(device).contiguous()
    total = None
    try:
        for source in range(size):
            buffer = mine if source == rank else torch.empty_like(mine)
            dist.broadcast(buffer, src=dist.get_global_rank(group, source), group=group)
            total = buffer.clone() if total is None else total + buffer
    except RuntimeError as exc:  # gloo / NCCL errors (DistBackendError is a RuntimeError)
        raise _failed(what, exc) from None
    return total.to(tensor.device)


def gather_rows(tensor: torch.Tensor, group=None, *, what: str = "a gather over the ranks") -> torch.Tensor:
    """[Σ b_r, ...]: every rank's rows ``tensor`` [b_r, ...] concatenated in rank order, on every rank (b_r
    may differ; the other dimensions and the dtype must agree). One process: ``tensor`` itself."""
    group = resolve_group(group)
    if group is None:
        return tensor
    dist = _dist()
    rank, size = rank_and_size(group)
    device = _device(group)
    try:
        counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(size)]
        dist.all_gather(counts, torch.tensor([tensor.shape[0]], dtype=torch.int64, device=device), group=group)
        sizes = [int(c) for c in counts]
        padded = torch.zeros((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=device)
        padded[: sizes[rank]] = tensor.detach().to(device)
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded, group=group)
    except RuntimeError as exc:
        raise _failed(what, exc) from None
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]).to(tensor.device)


def gather_max(value: float, group=None) -> float:
    """The largest of every rank's ``value`` (e.g. a wall time)."""
    group = resolve_group(group)
    if group is None:
        return value
    values = gather_rows(torch.tensor([value], dtype=torch.float64), group, what="a gather of timings")
    return float(values.max())
