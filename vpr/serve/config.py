"""The server's settings, passed as JSON through the environment to uvicorn's worker processes."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from vpr.errors import UsageError

ENV_VAR = "VPR_SERVE_CONFIG"


@dataclass(frozen=True)
class ServeConfig:
    """What `vpr serve` serves and its limits: batching, body size, images per request, pixels, k, requests in flight."""

    index: Path
    device: str = "auto"
    amp: bool = False
    backend: str = "torch"  # or onnxruntime, openvino, an exported graph file (vpr.deploy)
    batching: bool = True
    max_batch: int = 32  # images per forward pass
    batch_window_ms: float = 5.0  # how long the first request of a batch waits for others
    max_in_flight: int = 64  # /query requests being served at once; more get 503
    max_body_bytes: int = 16 * 1024 * 1024  # per request, all images and form fields; more gets 413
    max_images: int = 16  # images per /query request
    max_pixels: int = 40_000_000  # per image, checked before decoding
    max_input_pixels: int = 1 << 20  # per image, the model input after the index's resize rule (native-size methods)
    max_k: int = 100
    token: str | None = None
    thumbnail_size: int = 320  # longest side of /images/{id}
    allowed_hosts: tuple[str, ...] = ()  # Host headers answered besides the loopback names ("*": any)
    min_upload_rate: int = 32 * 1024  # bytes/s a request body must keep up with after `upload_grace_s` (408 below)
    upload_grace_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_in_flight", "max_body_bytes", "max_images", "max_pixels", "max_input_pixels",
                     "max_k", "thumbnail_size", "min_upload_rate"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if not 0 < self.upload_grace_s <= 600:
            raise UsageError(f"upload grace {self.upload_grace_s} s: must be between 0 and 600")
        object.__setattr__(self, "allowed_hosts", tuple(str(host) for host in self.allowed_hosts))
        if not 0 <= self.batch_window_ms <= 1000:
            raise UsageError(f"batch window {self.batch_window_ms} ms: must be between 0 and 1000")
        if self.token is not None and not self.token.strip():
            raise UsageError("`token` is empty; give a secret string or drop `token`")

    def to_env(self) -> None:
        """Hand the settings to worker processes (uvicorn --workers) through the environment."""
        os.environ[ENV_VAR] = json.dumps({**asdict(self), "index": str(self.index)})

    @classmethod
    def from_env(cls) -> "ServeConfig":
        """The settings `to_env` left for this worker process."""
        data = json.loads(os.environ[ENV_VAR])
        return cls(**{**data, "index": Path(data["index"]), "allowed_hosts": tuple(data.get("allowed_hosts", ()))})
