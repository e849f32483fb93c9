"""The FastAPI app: `/query`, `/images/{id}`, `/positions`, `/info`, `/health`, the page at `/` and `/docs`."""

import asyncio
import io
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Annotated

import torch
from fastapi import FastAPI, File, Form, HTTPException, Path as PathParam, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from vpr import __version__
from vpr.api import Index, QueryResult
from vpr.errors import ImageError, NotAnImage, UsageError, VPRError
from vpr.serve.batching import Batcher
from vpr.serve.config import ServeConfig
from vpr.serve.guard import Guard

log = logging.getLogger(__name__)
STATIC = Path(str(resources.files("vpr.serve") / "static"))
MAX_MAP_POINTS = 20_000  # database positions sent to the page's map (evenly subsampled beyond)
THUMBNAILS_CACHED = 512
THUMBNAIL_THREADS = 2  # thumbnails made at once: each may decode a large photo
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
DECODE_THREADS = min(4, os.cpu_count() or 1)  # uploads decoded at once: more only contend for the cores
PAGE_POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'")


class Thumbnails:
    """JPEG thumbnails of database images by row id, the most recent ones kept in memory.

    At most THUMBNAIL_THREADS are made at once, and JPEGs are decoded straight at a reduced scale
    (`load_thumbnail`), so many requests for large database photos cannot exhaust the server's memory."""

    def __init__(self, index: Index, size: int) -> None:
        self.index = index
        self.size = size
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._making = threading.Semaphore(THUMBNAIL_THREADS)

    def get(self, image_id: int) -> bytes:
        """The thumbnail of database row `image_id` (`IndexError` outside the database, `ImageError` if unreadable)."""
        with self._lock:
            if image_id in self._cache:
                self._cache.move_to_end(image_id)
                return self._cache[image_id]
        with self._making:
            image = self.index.thumbnail(image_id, self.size)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
        with self._lock:
            self._cache[image_id] = buffer.getvalue()
            if len(self._cache) > THUMBNAILS_CACHED:
                self._cache.popitem(last=False)
        return buffer.getvalue()


def _error(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def create_app(config: ServeConfig, index: Index | None = None) -> FastAPI:
    """The app serving `index` (loaded from `config.index` when not given) under `config`'s limits."""
    index = index or Index.load(config.index, device=config.device, amp=config.amp, batch_size=config.max_batch,
                                backend=config.backend)
    batcher = Batcher(index_runner(index), max_batch=config.max_batch, window=config.batch_window_ms / 1000,
                      enabled=config.batching)
    thumbnails = Thumbnails(index, config.thumbnail_size)
    root = index.database_root()
    decoders = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="vpr-decode")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        batcher.close()
        decoders.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="vpr", version=__version__, lifespan=lifespan,
        description="Visual place recognition: where was this photo taken? Upload photos to `/query`; "
                    "the page at `/` does it in a browser.",
    )
    app.state.index, app.state.batcher, app.state.config = index, batcher, config
    app.add_middleware(Guard, token=config.token, max_body_bytes=config.max_body_bytes,
                       max_in_flight=config.max_in_flight, min_upload_rate=config.min_upload_rate,
                       upload_grace_s=config.upload_grace_s)
    # outermost: a page the user visits cannot read the API through DNS rebinding (its Host is the attacker's name)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=[*LOOPBACK_HOSTS, *config.allowed_hosts])
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_error_handlers(app)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/health", summary="Liveness, and how much the model has done")
    def health() -> dict:
        return {"status": "ok", "forward_passes": batcher.batches, "images": batcher.images, "waiting": batcher.waiting}

    @app.get("/info", summary="The index: model, descriptor size, database count, index kind; the server's limits")
    def info() -> dict:
        limits = {key: getattr(config, key) for key in (
            "max_k", "max_images", "max_body_bytes", "max_pixels", "max_in_flight", "batching", "max_batch",
            "batch_window_ms")}
        return {**index.info(), "index": Path(config.index).name, "limits": limits}

    @app.get("/positions", summary="Database positions (UTM) for a map, at most 20,000 evenly chosen")
    def positions() -> dict:
        return index.positions(MAX_MAP_POINTS)

    @app.get("/images/{image_id}", summary="A JPEG thumbnail of database image `image_id` (a row of the index)",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}, 404: {}})
    def image(image_id: Annotated[int, PathParam(ge=0, description="The match's `id`")]) -> Response:
        try:
            data = thumbnails.get(image_id)
        except IndexError:
            return _error(404, f"no database image {image_id}: ids run from 0 to {len(index) - 1}")
        except ImageError as exc:
            log.warning("thumbnail %d: %s", image_id, exc)
            return _error(404, f"database image {image_id} is unreadable on the server")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/query", summary="Where were these photos taken: top-k matches and a position per image")
    async def query(
        images: Annotated[list[UploadFile], File(description="One or more image files (JPEG, PNG, WebP, BMP, TIFF)")],
        k: Annotated[int, Form(ge=1, le=config.max_k, description="Matches per image")] = 5,
    ) -> dict:
        start = time.perf_counter()
        if len(images) > config.max_images:
            raise HTTPException(413, f"{len(images)} images in one request; send at most {config.max_images}")
        tensors = []
        loop = asyncio.get_running_loop()
        for i, upload in enumerate(images):
            data = await upload.read()
            name = upload.filename or f"image {i}"
            tensors.append(await loop.run_in_executor(decoders, index.prepare, data, name, config.max_pixels,
                                                      config.max_input_pixels))
        results = await batcher.submit(tensors, k)
        named = [replace(r, query=upload.filename or f"image {i}", matches=[
            replace(m, path=Path(os.path.relpath(m.path, root)).as_posix()) for m in r.matches])
            for i, (r, upload) in enumerate(zip(results, images))]
        return {"results": [r.to_dict() for r in named], "k": k, "seconds": round(time.perf_counter() - start, 4)}

    return app


def index_runner(index: Index):
    """What the model thread runs for a batch: descriptors, then the search with the batch's largest k."""
    def run(batch: list[torch.Tensor], k: int) -> list[QueryResult]:
        return index.search(index.describe_batch(batch), k)

    return run


def _add_error_handlers(app: FastAPI) -> None:
    """Image problems as 415/422 naming the cause; anything unexpected as a JSON 500 (the server carries on)."""
    @app.exception_handler(NotAnImage)
    async def not_an_image(request: Request, exc: NotAnImage) -> JSONResponse:
        return _error(415, str(exc))

    @app.exception_handler(ImageError)
    async def bad_image(request: Request, exc: ImageError) -> JSONResponse:  # corrupt, truncated, too many pixels
        return _error(422, str(exc))

    @app.exception_handler(UsageError)
    async def usage(request: Request, exc: UsageError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(VPRError)
    async def vpr_error(request: Request, exc: VPRError) -> JSONResponse:
        log.error("%s %s: %s", request.method, request.url.path, exc)
        return _error(500, str(exc))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal error ({type(exc).__name__}); the server logged it")


def app_from_env() -> FastAPI:
    """The app of one uvicorn worker process (`vpr serve --workers N`), from `ServeConfig.to_env`."""
    return create_app(ServeConfig.from_env())
