"""`vpr serve` under attack, over real HTTP where it matters: a foreign Host header (DNS rebinding) is refused,
a tiny upload that would become a huge model input is a quick 422, a client trickling its body is cut off
with 408, thumbnails count against the in-flight limit and decode at a reduced scale, and a taken port or
a host that does not resolve is a one-line error."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from conftest import free_port, run_cli, write_places
from vpr.api import Index
from vpr.data.images import decode_rgb
from vpr.models.model import ModelConfig, build_model
from vpr.retrieval.options import ExtractOptions
from vpr.retrieval.build import build_index
from vpr.data.datasets import load_image_set
from vpr.serve import ServeConfig, create_app
from vpr.serve.guard import Guard
from vpr.serve.run import bind

FOREIGN = "rebind.attacker.example"


def index_with(tmp_path, **preprocessing) -> Index:
    write_places(tmp_path / "p", 3, seed=4)
    out = tmp_path / "idx"
    config = ModelConfig(descriptor_dim=16, layer=3, **preprocessing)
    build_index(load_image_set(tmp_path / "p" / "database"), out, model=build_model(config, seed=0),
                options=ExtractOptions(num_workers=0))
    return Index.load(out, device="cpu")


@pytest.fixture(scope="module")
def places_server(places_index):
    config = ServeConfig(index=places_index, device="cpu", thumbnail_size=32)
    with TestClient(create_app(config, Index.load(places_index, device="cpu")), base_url="http://127.0.0.1:8000") as client:
        yield client


@pytest.mark.parametrize("route", ["/images/0", "/positions", "/info", "/health", "/"])
def test_a_foreign_host_header_is_refused(places_server, route):
    assert places_server.get(route, headers={"Host": FOREIGN}).status_code == 400
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert places_server.get(route, headers={"Host": host}).status_code == 200, host


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def test_a_tiny_upload_that_would_become_a_huge_model_input_is_a_quick_422(tmp_path):
    index = index_with(tmp_path, resize="shorter", input_size=(16, 16))
    strip = png(200_000, 1)  # a few hundred bytes; at shorter side 16: 16 x 3.2 million pixels
    assert len(strip) < 2000
    config = ServeConfig(index=index.bundle.directory, device="cpu")
    with TestClient(create_app(config, index), base_url="http://localhost") as client:
        start = time.perf_counter()
        response = client.post("/query", files=[("images", ("strip.png", strip, "image/png"))])
        assert response.status_code == 422 and "model input" in response.json()["detail"]
        assert time.perf_counter() - start < 5


def test_a_native_size_index_refuses_an_upload_past_its_input_limit(tmp_path):
    index = index_with(tmp_path, resize="native", input_size=(48, 64))
    config = ServeConfig(index=index.bundle.directory, device="cpu", max_input_pixels=100_000)
    buffer = io.BytesIO()
    Image.new("RGB", (400, 400), (20, 90, 40)).save(buffer, format="JPEG")
    with TestClient(create_app(config, index), base_url="http://localhost") as client:
        response = client.post("/query", files=[("images", ("big.jpg", buffer.getvalue(), "image/jpeg"))])
        assert response.status_code == 422 and "100,000 pixels" in response.json()["detail"]
        small = io.BytesIO()
        Image.new("RGB", (64, 48), (20, 90, 40)).save(small, format="JPEG")
        assert client.post("/query", files=[("images", ("ok.jpg", small.getvalue(), "image/jpeg"))]).status_code == 200


@pytest.fixture()
def live_server(places_index):
    """A real uvicorn server on a free loopback port, with a 1 s upload grace and 1 KiB/s minimum rate."""
    config = ServeConfig(index=places_index, device="cpu", upload_grace_s=1.0, min_upload_rate=1024)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(config), log_level="warning"))
    sock = bind("127.0.0.1", port)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def test_a_client_trickling_its_body_is_cut_off_with_408(live_server):
    with socket.create_connection(("127.0.0.1", live_server), timeout=20) as conn:
        conn.sendall(b"POST /query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                     b"Content-Length: 100000\r\n\r\n"
                     b"--x\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.jpg\"\r\n\r\n")
        start = time.monotonic()
        reply = b""
        conn.settimeout(0.5)
        while time.monotonic() - start < 15 and b"\r\n\r\n" not in reply:
            try:
                conn.sendall(b"a")  # one byte of the file every half second: far below 1 KiB/s
                reply += conn.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                break
        elapsed = time.monotonic() - start
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert elapsed < 10


def test_a_foreign_host_is_refused_over_real_http_too(live_server):
    response = httpx.get(f"http://127.0.0.1:{live_server}/positions", headers={"Host": FOREIGN})
    assert response.status_code == 400
    assert httpx.get(f"http://127.0.0.1:{live_server}/positions").status_code == 200


def test_thumbnails_count_against_the_in_flight_limit():
    release = asyncio.Event()

    async def slow_app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"jpeg"})

    guard = Guard(slow_app, token=None, max_body_bytes=1000, max_in_flight=1)

    async def run() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://localhost") as client:
            first = asyncio.create_task(client.get("/images/1"))
            await asyncio.sleep(0.2)
            second = await client.get("/images/2")
            release.set()
            return [(await first).status_code, second.status_code]

    assert asyncio.run(run()) == [200, 503]


def test_a_large_jpeg_thumbnail_is_decoded_at_a_reduced_scale(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (200, 30, 30)).save(path, quality=80)
    assert decode_rgb(path, str(path), draft=320).size == (500, 375)  # 1/8 scale: 24x fewer pixels decoded


def test_a_taken_port_is_a_one_line_error(monkeypatch, capsys, places_index):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, _, err = run_cli(monkeypatch, capsys, "serve", "--index", places_index, "--device", "cpu", "--port", port)
    assert code == 1 and f"port {port}" in err and "already in use" in err and len(err.strip().splitlines()) == 1


def test_a_host_that_does_not_resolve_is_a_one_line_error(monkeypatch, capsys, places_index):
    code, _, err = run_cli(monkeypatch, capsys, "serve", "--index", places_index, "--device", "cpu",
                           "--host", "no-such-host.invalid", "--token", "t")
    assert code == 1 and "no-such-host.invalid" in err and "does not resolve" in err and len(err.strip().splitlines()) == 1
