"""Rank, world size, sharding and gathering for runs under `torchrun`: the one place that reads its
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and talks to `torch.distributed`.

A plain `python`/`vpr` process is rank 0 of a world of 1, and every function here is then a no-op,
so callers never branch on whether they run distributed.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vpr.errors import UsageError, VPRError

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 600  # a collective waits this long for a dead or stuck rank before failing
MESSAGE_BYTES = 64 << 20  # descriptors travel to rank 0 in messages of at most this size: bounded memory on both sides


class Reported(VPRError):
    """An error rank 0 reports for the whole job: another rank raises this and should exit quietly
    with status 0, so that the launcher does not stop rank 0 before it has reported."""


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device | str = "cpu", timeout_s: float | None = None) -> None:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on the CPU); no-op outside torchrun or when joined.

    `timeout_s` (default $VPR_DIST_TIMEOUT or 600) bounds every collective, so a rank that dies stops
    the others with an error instead of a hang.
    """
    if not launched() or dist.is_initialized():
        return
    missing = [key for key in ("RANK", "MASTER_ADDR", "MASTER_PORT") if key not in os.environ]
    if missing:
        raise UsageError(f"WORLD_SIZE is set but {', '.join(missing)} is not: start distributed runs with torchrun")
    timeout_s = timeout_s or float(os.environ.get("VPR_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))  # object collectives run on the current device
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    log.info("rank %d of %d joined (%s)", rank(), world_size(), backend)


def joined() -> bool:
    """Whether this process is one of several in a joined process group (work is then sharded)."""
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside torchrun)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many processes share the work (1 outside torchrun)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's rank on its node: the CUDA device it should use."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this process writes outputs and prints (rank 0)."""
    return rank() == 0


def shard(count: int) -> np.ndarray:
    """The item indices this rank handles: a contiguous block, blocks in rank order, sizes within one."""
    bounds = np.linspace(0, count, world_size() + 1).round().astype(np.int64)
    return np.arange(bounds[rank()], bounds[rank() + 1], dtype=np.int64)


def barrier() -> None:
    """Wait for every rank (bounded by the group's timeout)."""
    if dist.is_initialized():
        dist.barrier()


def gather_object(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None on the others; a one-item list outside torchrun).

    A rank that died or timed out is a `VPRError` here, so the job stops with one clear line.
    """
    if not dist.is_initialized():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    try:
        dist.gather_object(obj, out, dst=0)
    except RuntimeError as exc:
        raise _lost_rank(exc) from exc
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    try:
        dist.broadcast_object_list(box, src=src)
    except RuntimeError as exc:
        raise _lost_rank(exc) from exc
    return box[0]


@contextmanager
def main_first(setup: Callable[[], AbstractContextManager]) -> Iterator[None]:
    """Enter `setup()` (output checks, locks) on rank 0 only, for the whole block; every rank waits for it,
    and an error it raised is raised on every rank, so no rank starts work rank 0 refused."""
    with ExitStack() as stack:
        error: BaseException | None = None
        if is_main():
            try:
                stack.enter_context(setup())
            except Exception as exc:  # sent to the other ranks, then raised here too
                error = exc
        error = broadcast_object(error)
        if error is not None:
            raise error if is_main() else Reported(str(error))
        yield


def _lost_rank(exc: RuntimeError) -> VPRError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return VPRError(f"rank {rank()}: another rank of the {world_size()} died or timed out ({reason}); "
                    "see its log, then rerun (cached descriptors are reused)")


def _wire() -> torch.device:
    """Where tensors travel between ranks: NCCL moves CUDA tensors only, gloo CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_blocks(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor` (n_r x ...; n_r may differ, even be 0) in rank order, on every rank and on its device:
    one padded all-gather, so nothing is pickled (`[tensor]` outside torchrun). No gradient flows through it."""
    if not dist.is_initialized():
        return [tensor]
    wire = _wire()
    try:
        counts = [torch.zeros(1, dtype=torch.int64, device=wire) for _ in range(world_size())]
        dist.all_gather(counts, torch.tensor([len(tensor)], dtype=torch.int64, device=wire))
        sizes = [int(c.item()) for c in counts]
        padded = torch.zeros((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=wire)
        padded[:len(tensor)] = tensor.detach().to(wire)
        blocks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(blocks, padded)
    except RuntimeError as exc:
        raise _lost_rank(exc) from exc
    return [block[:n].to(tensor.device) for block, n in zip(blocks, sizes)]


def all_gather_rows(rows: np.ndarray) -> np.ndarray:
    """Every rank's `rows` (n_r x d float32; n_r may differ, even be 0) stacked in rank order, on every rank
    (`rows` itself outside torchrun)."""
    if not dist.is_initialized():
        return rows
    blocks = all_gather_blocks(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)))
    return torch.cat(blocks).cpu().numpy()


def gather_rows(rows, counts: list[int] | None, out) -> None:
    """Every rank's `rows` (an array or a `RowReader`), written into rank 0's `out` in rank order.

    Rank 0 passes `counts` (each rank's row count) and `out` (sum(counts) x d: an array or a spill
    file); the others pass None for both and send. Rows travel `MESSAGE_BYTES` at a time, one message
    from each rank in turn (so no rank waits on the others' whole blocks), and no rank holds more than
    its own rows and one message. Outside torchrun this copies `rows` into `out`.
    """
    wire = _wire() if dist.is_initialized() else torch.device("cpu")
    chunk = max(1, MESSAGE_BYTES // (4 * rows.shape[1]))
    try:
        if not is_main():
            for first in range(0, len(rows), chunk):
                block = np.ascontiguousarray(rows[first:first + chunk], dtype=np.float32)
                dist.send(torch.from_numpy(block).to(wire), dst=0)
            return
        starts = np.concatenate([[0], np.cumsum(counts)])
        for first in range(0, max(counts), chunk):
            for source, count in enumerate(counts):
                n = min(chunk, count - first)
                if n <= 0:
                    continue
                if source == 0:
                    block = np.asarray(rows[first:first + n], dtype=np.float32)
                else:
                    buffer = torch.empty((n, out.shape[1]), dtype=torch.float32, device=wire)
                    dist.recv(buffer, src=source)
                    block = buffer.cpu().numpy()
                out[starts[source] + first:starts[source] + first + n] = block
    except RuntimeError as exc:
        raise _lost_rank(exc) from exc


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: DDP syncs them before each training
    forward only, so after a step each rank's differ; sharded extraction with the model needs one model."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def shutdown() -> None:
    """Leave the process group (at the end of a command)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average `tensor` over the ranks, in place (unchanged outside torchrun); returns it."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
        tensor.div_(world_size())
    return tensor
