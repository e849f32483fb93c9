"""Run the app under uvicorn: one process holding the index, or `workers` processes each loading it."""

from __future__ import annotations

import ipaddress
import logging

import uvicorn

from vpr.retrieval.store import read_manifest
from vpr.serve.app import create_app
from vpr.serve.config import ServeConfig

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether binding to `host` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          log_level: str = "info") -> None:
    """Serve until interrupted. The index is loaded (and validated) before the port opens; with
    `workers` > 1 each worker process loads its own copy."""
    if workers == 1:
        uvicorn.run(create_app(config), host=host, port=port, log_level=log_level)
        return
    read_manifest(config.index)  # a bad index fails here, once, rather than in every worker
    config.to_env()
    uvicorn.run("vpr.serve.app:app_from_env", factory=True, host=host, port=port, workers=workers, log_level=log_level)
