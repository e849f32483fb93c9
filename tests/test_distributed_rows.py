"""Descriptors travelling between ranks as tensors (2 CPU ranks, gloo): the padded all-gather of NetVLAD's
cache, the chunked gather to rank 0 of a build, a spilled torchrun build equal to the one-process one,
and rank 0's BatchNorm statistics on every rank before a sharded extraction."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port, join_gloo
from vpr import distributed
from vpr.data.datasets import load_image_set
from vpr.models.model import build_model
from vpr.retrieval.options import ExtractOptions
from vpr.retrieval.build import build_index
from vpr.retrieval.rows import spill_rows

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
COUNTS = (5, 0, 7)  # rows per rank: uneven, one rank with none


def rows_of(rank: int) -> np.ndarray:
    return np.random.default_rng(rank).standard_normal((COUNTS[rank], 6)).astype(np.float32)


def gather_ranks(rank: int, world: int, port: int, out_dir: str) -> None:
    """Each rank all-gathers and gathers its rows (3 per message); rank 0 saves what it received."""
    join_gloo(rank, world, port)
    distributed.MESSAGE_BYTES = 3 * 6 * 4
    try:
        mine = rows_of(rank)
        np.save(Path(out_dir) / f"all-{rank}.npy", distributed.all_gather_rows(mine))
        counts = list(COUNTS) if rank == 0 else None
        memory = np.full((sum(COUNTS), 6), np.nan, dtype=np.float32) if rank == 0 else None
        distributed.gather_rows(mine, counts, memory)
        disk = spill_rows(Path(out_dir), (sum(COUNTS), 6)) if rank == 0 else None
        distributed.gather_rows(mine, counts, disk)
        if rank == 0:
            np.save(Path(out_dir) / "memory.npy", memory)
            np.save(Path(out_dir) / "disk.npy", disk[:])
    finally:
        distributed.shutdown()


def test_rows_reach_every_rank_by_all_gather_and_rank_0_by_chunks_in_rank_order(tmp_path):
    mp.spawn(gather_ranks, args=(3, free_port(), str(tmp_path)), nprocs=3, join=True)
    expected = np.concatenate([rows_of(rank) for rank in range(3)])
    for rank in range(3):
        np.testing.assert_array_equal(np.load(tmp_path / f"all-{rank}.npy"), expected)
    np.testing.assert_array_equal(np.load(tmp_path / "memory.npy"), expected)
    np.testing.assert_array_equal(np.load(tmp_path / "disk.npy"), expected)


def build_ranks(rank: int, world: int, port: int, places: str, out: str, config) -> None:
    """A torchrun build that spills (`spill_bytes=0`): every rank its block, rank 0 the whole database."""
    join_gloo(rank, world, port)
    distributed.MESSAGE_BYTES = 5 * config.descriptor_dim * 4
    try:
        build_index(load_image_set(Path(places) / "database"), Path(out), model=build_model(config, seed=0),
                    options=ExtractOptions(batch_size=4, num_workers=0), pca_dim=8, spill_bytes=0)
    finally:
        distributed.shutdown()


def test_a_spilled_two_rank_build_equals_the_one_process_build_and_leaves_nothing_behind(places, tiny_config, tmp_path):
    spilled, memory = tmp_path / "out" / "spilled", tmp_path / "memory"
    mp.spawn(build_ranks, args=(2, free_port(), str(places), str(spilled), tiny_config), nprocs=2, join=True)
    build_index(load_image_set(places / "database"), memory, model=build_model(tiny_config, seed=0),
                options=ExtractOptions(batch_size=4, num_workers=0), pca_dim=8)
    with h5py.File(spilled / "database.h5") as a, h5py.File(memory / "database.h5") as b:
        assert list(a["paths"].asstr()[:]) == list(b["paths"].asstr()[:])
        np.testing.assert_allclose(a["descriptors"][:], b["descriptors"][:], atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.endswith(".lock")) == ["spilled"]


def buffer_ranks(rank: int, world: int, port: int, out_dir: str) -> None:
    join_gloo(rank, world, port)
    try:
        norm = torch.nn.BatchNorm1d(4)
        norm.running_mean.fill_(float(rank + 1))  # as after a training step on each rank's own images
        distributed.broadcast_buffers(norm)
        np.save(Path(out_dir) / f"mean-{rank}.npy", norm.running_mean.numpy())
    finally:
        distributed.shutdown()


def test_rank_0_batchnorm_statistics_reach_every_rank(tmp_path):
    mp.spawn(buffer_ranks, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"mean-{rank}.npy"), np.ones(4, dtype=np.float32))
