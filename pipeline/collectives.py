"""Collectives over torch.distributed that are no-ops in a single process: rank / world size (the
one way any module asks), sums, max, broadcast, barrier, and gathering rows from every rank without
padding duplicates (used by the FID / bpd evaluation), plus rank-independent seeds."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


def rank_world(state=None) -> tuple[int, int]:
    """(rank, world size): torch.distributed's when initialised (the collectives use it;
    Accelerate's state can say 1 process on a CPU-only machine although the process group
    spans all ranks), else the Accelerate state's / Accelerator's, else the launcher's
    (torchrun / accelerate launch set RANK and WORLD_SIZE before any process group exists, and
    they still hold after it is torn down), else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if state is not None:
        return int(state.process_index), int(state.num_processes)
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main_rank(state=None) -> bool:
    """Rank 0 (``rank_world``): the process that writes files and status lines."""
    return rank_world(state)[0] == 0


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _coll_device() -> torch.device:
    """Device collectives run on: CUDA for NCCL, CPU otherwise (gloo)."""
    if _distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (returns a new tensor on the input's device)."""
    if not _distributed():
        return t.clone()
    dev = t.device
    buf = t.detach().to(_coll_device()).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(dev)


def all_reduce_max_int(v: int) -> int:
    if not _distributed():
        return int(v)
    buf = torch.tensor([int(v)], dtype=torch.int64, device=_coll_device())
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return int(buf.item())


def broadcast_float(v: float, src: int = 0) -> float:
    if not _distributed():
        return float(v)
    buf = torch.tensor([float(v)], dtype=torch.float64, device=_coll_device())
    dist.broadcast(buf, src)
    return float(buf.item())


def barrier() -> None:
    if _distributed():
        dist.barrier()


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's rows (rank order) on every rank; exactly Σ n_r rows.

    Ranks may hold different numbers of rows (zero included): rows are padded to the
    largest count for the collective and the padding is cut off again, so nothing is
    duplicated. ``t`` must have the same trailing shape and dtype on every rank.
    """
    if not _distributed():
        return t.detach().clone()
    dev = t.device
    world = dist.get_world_size()
    cdev = _coll_device()
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=cdev)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    counts = [int(c.item()) for c in counts]
    m = max(counts)
    pad = torch.zeros((m,) + tuple(t.shape[1:]), dtype=t.dtype, device=cdev)
    pad[: t.shape[0]] = t.detach().to(cdev)
    bufs = [torch.zeros_like(pad) for _ in range(world)]
    dist.all_gather(bufs, pad)
    return torch.cat([b[:c] for b, c in zip(bufs, counts)]).to(dev)


def gather_by_index(index: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather (global index, row) pairs from all ranks and sort them by index."""
    idx = gather_rows(index.to(torch.int64).reshape(-1))
    val = gather_rows(rows)
    order = torch.argsort(idx)
    return idx[order], val[order]


def rng_for(*keys: int) -> np.random.Generator:
    """A numpy generator from integer keys (seed, epoch, shard, ...): the data order's randomness. Its
    values are kept as they were (a checkpoint's data position depends on them), hence not seed_for's."""
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


def seed_for(*keys: int) -> int:
    """A 63-bit seed from integer keys (seed, pass, batch index, ...); independent of rank."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))
