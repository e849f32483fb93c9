"""`vpr serve`: the Python API (`vpr.api.Index`) over HTTP, with batched model passes and a web page.

`config.py` (the server's settings), `batching.py` (concurrent requests into one forward pass, in one
model thread), `guard.py` (token, body size and in-flight limits before a request is read), `app.py`
(the FastAPI routes), `run.py` (uvicorn), `static/` (the page at `/`).
"""

from importlib.util import find_spec

from vpr.errors import DependencyError

for _module in ("fastapi", "uvicorn", "python_multipart"):
    if find_spec(_module) is None:
        raise DependencyError(f"vpr serve needs {_module}: pip install -e '.[serve]'")

from vpr.serve.app import create_app  # noqa: E402
from vpr.serve.config import ServeConfig  # noqa: E402
from vpr.serve.run import is_loopback, serve  # noqa: E402

__all__ = ["ServeConfig", "create_app", "is_loopback", "serve"]
