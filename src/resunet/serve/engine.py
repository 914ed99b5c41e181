"""The inference side of the service: one object owns the model, the request queue and the micro-batching.

Requests put (image, TTA) on a bounded queue and await a future. One batcher task takes what is waiting — up to
`max_batch` images, waiting at most `max_wait_ms` for more after the first — groups them by the shapes the network
will see (`Predictor.batch_key`: images of different sizes often share a working shape), and runs each group as one
forward pass on a single inference thread, so the event loop keeps accepting and answering while the model runs.

All PyTorch work — loading the model included — happens on that one thread. Each thread that calls into PyTorch gets
its own OpenMP team, and two teams on the same cores cost a third of the speed (a CamVid image took 190 ms instead
of 130 ms on a 2-core Xeon when the model had been loaded on the main thread).
"""

from __future__ import annotations

import asyncio
import copy
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..checkpoint import CheckpointError
from ..predict import Predictor, max_working_pixels
from .metrics import ServiceMetrics

REQUEST_TTA = ("none", "flip")


class QueueFullError(Exception):
    """More requests are waiting than `max_queue`: the client should retry later."""


class EngineStoppedError(Exception):
    """The engine is not running (not started yet, or stopped): its images will not be computed."""


@dataclass
class Job:
    image: np.ndarray
    tta: str
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class Result:
    mask: np.ndarray
    queue_ms: float
    inference_ms: float
    batch_size: int


def tta_variants(predictor: Predictor) -> dict[str, Predictor]:
    """The predictor under each TTA a request may ask for. Copies share the model (or onnxruntime session); only
    the inference setting differs. An end-to-end ONNX graph runs only the TTA baked into it."""
    variants = {}
    for tta in REQUEST_TTA:
        if tta == predictor.tta:
            variants[tta] = predictor
            continue
        variant = copy.copy(predictor)
        try:
            variant.set_inference(tta, predictor.scales, predictor.window, predictor.stride)
        except CheckpointError:
            continue
        if variant.tta == tta:
            variants[tta] = variant
    return variants


class InferenceEngine:
    def __init__(self, load_predictor: Callable[[], Predictor], metrics: ServiceMetrics, max_batch: int = 8,
                 max_wait_ms: float = 5.0, max_queue: int = 64) -> None:
        """`load_predictor` runs here, on the inference thread (its errors, e.g. a bad model file, raise here)."""
        if max_batch < 1 or max_queue < 1 or not 0 <= max_wait_ms < math.inf:
            raise ValueError("max_batch and max_queue must be ≥ 1 and max_wait_ms finite, ≥ 0")
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="resunet-inference")
        try:
            predictor = self.executor.submit(load_predictor).result()
        except BaseException:
            self.executor.shutdown(wait=False)
            raise
        self.predictor = predictor
        self.variants = tta_variants(predictor)
        self.default_tta = predictor.tta if predictor.tta in self.variants else "none"
        self.metrics = metrics
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000, max_queue
        self.ready = False
        self.warm_up_error: str | None = None  # why a warm-up in the background failed (the engine then never readies)
        self.starting: asyncio.Task | None = None
        self.stopping = threading.Event()  # read by the warm-up between its passes: a stop waits for one, not all
        self.queue: asyncio.Queue[Job] | None = None
        self.batcher: asyncio.Task | None = None
        self.waiting: set[asyncio.Future] = set()  # every submitted image's future until it is answered
        # The images in the queue whose clients still wait: one whose client went away stays in the queue until the
        # batcher skips it, between passes, and counted there it refused new requests (503) during a long pass.
        self.queued: set[asyncio.Future] = set()
        queued = self.queued  # not `self`: the metrics would keep the engine, and its model, alive
        metrics.queue_depth.set_function(lambda: len(queued))

    async def start(self, wait: bool = True, on_ready: Callable[[], None] | None = None) -> None:
        """Create the queue, warm the model up (the first passes build the kernels), start batching, then report
        ready and call `on_ready`. `wait=False`: return at once, warming up in the background (a server then answers
        /healthz and /readyz's 503 meanwhile); a failure there is kept in `warm_up_error`, and the engine stays
        unready."""
        self.queue = asyncio.Queue()  # bounded by `queued` (check_room): the live images, not the abandoned ones
        self.queued.clear()
        self.stopping.clear()
        self.warm_up_error = None  # an earlier start's: this one may succeed (it answered 503 for ever after)
        self.starting = asyncio.ensure_future(self._warm_up_then_batch(on_ready))
        if wait:
            await self.starting

    async def _warm_up_then_batch(self, on_ready: Callable[[], None] | None) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.warm_up)
        except Exception as error:
            self.warm_up_error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            raise
        self.batcher = asyncio.create_task(self.run_batches())
        self.ready = True
        if on_ready is not None:
            on_ready()

    async def stop(self) -> None:
        """Stop batching once the forward pass under way is done; every image still waiting (queued, or in that
        pass) fails with EngineStoppedError, and so does a later submit. The inference thread (holding the model)
        stays, so the app can start again (it ends with the process)."""
        self.ready = False
        self.stopping.set()
        if self.starting is not None and not self.starting.done():  # stopped while warming up
            self.starting.cancel()
        if self.batcher is not None:
            self.batcher.cancel()
            try:
                await self.batcher
            except asyncio.CancelledError:
                pass
            self.batcher = None
        await asyncio.get_running_loop().run_in_executor(self.executor, lambda: None)  # after the pass under way
        for future in list(self.waiting):  # else their submit() would wait for ever
            if not future.done():
                future.set_exception(EngineStoppedError("the service is stopping; this image was not computed"))

    def warm_up(self) -> None:
        size = self.predictor.size
        image = np.full((size, size * 4 // 3, 3), 127, np.uint8)
        for predictor in self.variants.values():
            for _ in range(2):
                if self.stopping.is_set():  # the service is stopping: the rest of the warm-up is for nothing
                    return
                predictor.predict_batch([image])

    def check_room(self) -> None:
        """QueueFullError when `max_queue` images are waiting: the service asks before decoding an upload."""
        if self.queue is not None and len(self.queued) >= self.max_queue:
            raise QueueFullError(f"{self.max_queue} requests are already waiting")

    async def submit(self, image: np.ndarray, tta: str | None = None) -> Result:
        """Queue one H×W×3 uint8 image and wait for its class map. QueueFullError when `max_queue` are waiting."""
        if self.batcher is None:
            raise EngineStoppedError("the engine is not running (start() it first, or it was stopped)")
        tta = tta or self.default_tta
        if tta not in self.variants:
            raise ValueError(f"tta '{tta}' is not available for this model (available: {', '.join(self.variants)})")
        self.check_room()
        job = Job(image, tta, asyncio.get_running_loop().create_future())
        self.queue.put_nowait(job)  # no await since the check: the room is still there
        self.queued.add(job.future)
        self.metrics.in_flight.inc()
        self.waiting.add(job.future)
        try:
            return await job.future
        finally:
            self.waiting.discard(job.future)
            self.queued.discard(job.future)
            self.metrics.in_flight.dec()
            # An image whose client went away waits in the queue until the batcher skips it, between passes: as a
            # few bytes, not its pixels (the service counts them free once its request is over).
            job.image = None

    async def next_batch(self) -> list[Job]:
        """The first waiting job, plus what else arrives within `max_wait` (up to `max_batch` in all)."""
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
            if self.stopping.is_set():  # Python 3.10/3.11's wait_for returns an item it got as stop() cancelled the
                raise asyncio.CancelledError  # batcher, dropping the cancel: the batcher waited for ever (stop too)
        self.queued.difference_update(job.future for job in batch)  # out of the queue: in the pass
        return batch

    async def run_batches(self) -> None:
        while True:
            # One call a batch: its jobs (each image, its mask, or a failed pass's error with the traceback that
            # holds the pass's images and tensors) go when it returns, not while the batcher waits for the next one.
            await self.run_batch(await self.next_batch())

    async def run_batch(self, batch: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        groups: dict[tuple, list[Job]] = {}
        for job in batch:
            if job.future.done():  # the client went away while it waited
                continue
            height, width = job.image.shape[:2]
            key = (job.tta,) + self.variants[job.tta].batch_key(height, width)
            groups.setdefault(key, []).append(job)
        for jobs in groups.values():
            jobs = [job for job in jobs if not job.future.done()]  # gone during an earlier group's pass
            for part in self.within_budget(jobs) if jobs else ():
                await self.run_group(loop, part)

    def within_budget(self, jobs: list[Job]) -> list[list[Job]]:
        """A group cut into forward passes of at most the working pixels one image may have: eight long images that
        each pass the bound must not take eight times its memory at once."""
        predictor = self.variants[jobs[0].tta]
        budget = max_working_pixels(predictor.size)
        parts: list[list[Job]] = [[]]
        used = 0
        for job in jobs:
            pixels = predictor.working_pixels(*job.image.shape[:2])
            if parts[-1] and used + pixels > budget:
                parts.append([])
                used = 0
            parts[-1].append(job)
            used += pixels
        return parts

    async def run_group(self, loop: asyncio.AbstractEventLoop, jobs: list[Job]) -> None:
        jobs = [job for job in jobs if not job.future.done()]  # gone during an earlier part's pass
        if not jobs:
            return
        predictor = self.variants[jobs[0].tta]
        started = time.perf_counter()
        try:
            masks = await loop.run_in_executor(self.executor, predictor.predict_batch, [job.image for job in jobs])
        except Exception as error:  # a model failure answers these requests with 500; the service goes on
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        inference_ms = 1000 * (time.perf_counter() - started)
        self.metrics.batch_size.observe(len(jobs))
        self.metrics.inference_seconds.observe(inference_ms / 1000)
        for job, mask in zip(jobs, masks):
            if not job.future.done():
                job.future.set_result(Result(mask, 1000 * (started - job.enqueued), inference_ms, len(jobs)))
