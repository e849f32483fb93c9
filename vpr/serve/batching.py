"""Concurrent requests into one forward pass: a short batching window, a maximum batch, one model thread.

The first request of a batch waits `window` seconds for others (while the model thread is busy,
requests queue up on their own); then up to `max_batch` images run as one call in a single worker
thread, so the event loop never waits on the model and the model never runs twice at once.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable

import torch

from vpr.api import QueryResult

log = logging.getLogger(__name__)
Run = Callable[[list[torch.Tensor], int], list[QueryResult]]


@dataclass
class _Job:
    images: list[torch.Tensor]
    k: int
    future: asyncio.Future


class Batcher:
    """Queue of prepared images (a list of 3 x H x W inputs per request) answered by `run(batch, k)` in one thread.

    With `enabled=False` each request gets its own forward pass (the comparison `vpr serve --no-batching` measures).
    """

    def __init__(self, run: Run, *, max_batch: int = 32, window: float = 0.005, enabled: bool = True) -> None:
        self.run = run
        self.max_batch = max_batch
        self.window = window
        self.enabled = enabled
        self.batches = 0  # forward passes so far
        self.images = 0  # images answered so far
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vpr-model")
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def waiting(self) -> int:
        """Requests queued for the model thread."""
        return 0 if self._queue is None else self._queue.qsize()

    async def submit(self, images: list[torch.Tensor], k: int) -> list[QueryResult]:
        """The top-k results of each image, computed together with other requests' images."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first call on this event loop: start the batching task here
            self._loop, self._queue = loop, asyncio.Queue()
            self._task = loop.create_task(self._serve(), name="vpr-batcher")
        job = _Job(images, k, loop.create_future())
        self._queue.put_nowait(job)
        return await job.future

    def close(self) -> None:
        """Stop the batching task and the model thread (after the running pass)."""
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _serve(self) -> None:
        carry: _Job | None = None
        while True:
            jobs = [carry or await self._queue.get()]
            carry = None
            if self.enabled:
                if self.window > 0:
                    await asyncio.sleep(self.window)
                count = len(jobs[0].images)
                while not self._queue.empty():
                    job = self._queue.get_nowait()
                    if count + len(job.images) > self.max_batch:
                        carry = job  # first in the next batch
                        break
                    jobs.append(job)
                    count += len(job.images)
            await self._answer(jobs)

    async def _answer(self, jobs: list[_Job]) -> None:
        jobs = [job for job in jobs if not job.future.done()]  # a client that left cancelled its future
        if not jobs:
            return
        batch = [image for job in jobs for image in job.images]
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.run, batch, max(job.k for job in jobs))
        except Exception as exc:  # the requests fail, the server carries on
            log.exception("model pass over %d images failed", len(batch))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        self.batches += 1
        self.images += len(batch)
        start = 0
        for job in jobs:
            mine = results[start:start + len(job.images)]
            start += len(job.images)
            if not job.future.done():
                job.future.set_result([replace(r, matches=r.matches[:job.k]) for r in mine])
