"""`vpr serve`: the index over HTTP (JSON API, web page, OpenAPI docs at /docs)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import AMP_HELP, BACKEND, device_of, err_console, warn_random_init
from cli.retrieval_cmds import DEFAULT_INDEX

MAX_WORKERS = 64


def serve_cmd(
    index: Path = typer.Option(DEFAULT_INDEX, "--index", "-i", help="Index directory from `vpr build-index`."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind: 127.0.0.1 (this machine only, the default) or e.g. 0.0.0.0 (every interface; give --token)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
    workers: int = typer.Option(1, "--workers", min=1, max=MAX_WORKERS, help="Server processes, each loading the index (memory grows with each)."),
    token: Optional[str] = typer.Option(None, "--token", envvar="VPR_TOKEN", help="Require 'Authorization: Bearer TOKEN' on the API (also from $VPR_TOKEN, which keeps it out of the process list)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    amp: bool = typer.Option(False, "--amp/--no-amp", help=AMP_HELP), backend: str = BACKEND,
    batching: bool = typer.Option(True, "--batching/--no-batching", help="Run concurrent requests' images through the model together."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, max=4096, help="Most images per forward pass."),
    batch_window: float = typer.Option(5.0, "--batch-window-ms", min=0, max=1000, help="How long a request waits for others to share its forward pass."),
    max_in_flight: int = typer.Option(64, "--max-in-flight", min=1, max=100_000, help="Concurrent /query requests; more are answered 503 with Retry-After."),
    max_upload_mb: float = typer.Option(16.0, "--max-upload-mb", min=0.01, max=4096, help="Largest request body (all images of a request); larger ones get 413."),
    max_images: int = typer.Option(16, "--max-images", min=1, max=4096, help="Most images in one /query request."),
    max_mpixels: float = typer.Option(40.0, "--max-mpixels", min=0.01, max=1000, help="Largest image in megapixels, checked before decoding (422 beyond)."),
    max_input_mpixels: float = typer.Option(1.05, "--max-input-mpixels", min=0.01, max=16.7, help="Largest model input in megapixels after the index's resize rule (native-size methods: 422 beyond; a ViT's time grows with its square)."),
    allowed_hosts: list[str] = typer.Option([], "--allowed-host", help="A name this server is reached by besides localhost and --host (the Host header of requests; repeat for several, '*' for any). Others get 400, so a web page cannot read the API through DNS rebinding."),
) -> None:
    """Serve an index: POST /query (images -> matches and position as JSON), a web page at /, docs at /docs."""
    from vpr.serve import ServeConfig, is_loopback, serve  # FastAPI and uvicorn load only for this command

    config = ServeConfig(
        index=index, device=device_of(device, amp) if backend == "torch" else "cpu", amp=amp, backend=backend, batching=batching, max_batch=max_batch,
        batch_window_ms=batch_window, max_in_flight=max_in_flight, max_body_bytes=int(max_upload_mb * 1024 * 1024),
        max_images=max_images, max_pixels=int(max_mpixels * 1_000_000), max_input_pixels=int(max_input_mpixels * 1_000_000),
        token=token, allowed_hosts=tuple(allowed_hosts),
    )
    if not is_loopback(host) and token is None:
        err_console.print(f"warning: --host {host} without --token: anyone who can reach this machine can query the index")
    serve(config, host=host, port=port, workers=workers,
          on_ready=lambda manifest: warn_random_init(manifest.get("random_init", False), str(index)))
