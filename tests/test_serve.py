"""`vpr serve`'s app, through FastAPI's test client and httpx: the routes, every error code, the token,
batching of concurrent requests into one forward pass, and a server that outlives a failing request."""

import asyncio
import io
import re
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import run_cli
from vpr.api import Index
from vpr.data.datasets import load_image_set
from vpr.serve import ServeConfig, create_app, is_loopback
from vpr.serve.app import STATIC

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def index_dir(places_index):
    return places_index


@pytest.fixture(scope="module")
def bundle(index_dir):
    return Index.load(index_dir, device="cpu").bundle


@pytest.fixture(scope="module")
def config(index_dir):
    return ServeConfig(index=index_dir, device="cpu", max_body_bytes=200_000, max_images=3, max_pixels=1_000_000,
                       max_k=20, thumbnail_size=32, allowed_hosts=("testserver", "vpr"))  # the test clients' host names


@pytest.fixture(scope="module")
def client(config, bundle):
    with TestClient(create_app(config, Index(bundle, "cpu"))) as client:
        yield client


@pytest.fixture(scope="module")
def queries(places):
    return load_image_set(places / "queries").paths


def upload(path: Path, name: str | None = None) -> tuple:
    return ("images", (name or path.name, path.read_bytes(), "image/jpeg"))


def png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size).save(buffer, format="PNG")
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    """A JPEG cut short after its headers: recognised as a JPEG, not decodable."""
    buffer = io.BytesIO()
    Image.effect_noise((64, 48), 60).convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3]


def test_query_returns_the_api_results_as_json(client, bundle, queries):
    response = client.post("/query", files=[upload(queries[2]), upload(queries[7])], data={"k": "4"})
    assert response.status_code == 200
    body = response.json()
    expected = Index(bundle, "cpu").query(queries[2:8:5], k=4, names=[queries[2].name, queries[7].name])
    assert body["k"] == 4 and len(body["results"]) == 2
    for got, want in zip(body["results"], expected):
        want = want.to_dict()
        assert got["query"] == want["query"]
        assert [m["id"] for m in got["matches"]] == [m["id"] for m in want["matches"]]
        assert [m["similarity"] for m in got["matches"]] == pytest.approx([m["similarity"] for m in want["matches"]], abs=1e-5)
        assert got["position"]["utm_east"] == pytest.approx(want["position"]["utm_east"], abs=1e-3)
    assert list(body["results"][0]["matches"][0]) == ["rank", "id", "path", "distance", "similarity", "utm_east",
                                                      "utm_north", "lat", "lon", "heading"]
    database = bundle.database.paths[0].parent
    assert [m["path"] for m in body["results"][0]["matches"]] == [bundle.database.paths[m["id"]].name
                                                                for m in body["results"][0]["matches"]]
    assert str(database) not in response.text and str(database) not in client.get("/info").text  # no server paths


def test_k_defaults_to_5(client, queries):
    assert len(client.post("/query", files=[upload(queries[0])]).json()["results"][0]["matches"]) == 5


def test_health_info_positions_and_openapi_docs(client):
    assert client.get("/health").json()["status"] == "ok"
    info = client.get("/info").json()
    assert (info["dim"], info["count"], info["index_kind"], info["model"]["head"]) == (64, 12, "flat", "cosplace")
    assert info["limits"]["max_k"] == 20 and info["limits"]["batching"] is True
    positions = client.get("/positions").json()
    assert len(positions["points"]) == 12 and positions["zone"] == [10, "S"]
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/query", "/images/{image_id}", "/health", "/info", "/positions"} <= set(paths)


def test_thumbnails_by_id_only(client, bundle):
    response = client.get("/images/3")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(response.content)) as thumb:
        assert max(thumb.size) == 32
    assert client.get("/images/12").status_code == 404
    assert "ids run from 0 to 11" in client.get("/images/12").json()["detail"]
    for bad in ("/images/-1", "/images/abc", "/images/%2e%2e%2fREADME.md", f"/images/{bundle.database.paths[0]}"):
        response = client.get(bad)
        assert response.status_code in (404, 422) and response.headers["content-type"] == "application/json"


def test_page_is_served_with_its_assets_and_no_external_resources(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    for path in STATIC.iterdir():
        urls = set(re.findall(r"https?://[^\s\"'`]+", path.read_text()))
        assert urls <= {"http://www.w3.org/2000/svg"}, (path.name, urls)


@pytest.mark.parametrize("files, data, status, cause", [
    ([("images", ("notes.txt", b"hello, not a photo", "text/plain"))], {}, 415, "notes.txt: not an image"),
    ([("images", ("cut.jpg", truncated_jpeg(), "image/jpeg"))], {}, 422, "cut.jpg: corrupt or truncated"),
    ([("images", ("big.png", png((2000, 1000)), "image/png"))], {}, 422, "2000x1000 pixels is over the limit"),
    ([("images", ("empty.jpg", b"", "image/jpeg"))], {}, 422, "empty"),
    ([("images", ("a.png", png((8, 8)), "image/png"))] * 4, {}, 413, "4 images in one request; send at most 3"),
    ([("images", ("a.png", png((8, 8)), "image/png"))], {"k": "0"}, 422, "greater than or equal to 1"),
    ([("images", ("a.png", png((8, 8)), "image/png"))], {"k": "21"}, 422, "less than or equal to 20"),
    ([("images", ("a.png", png((8, 8)), "image/png"))], {"k": "many"}, 422, "valid integer"),
    ([], {"k": "3"}, 422, "images"),
])
def test_bad_queries_get_a_json_error_naming_the_cause(client, files, data, status, cause):
    response = client.post("/query", files=files or None, data=data)
    assert response.status_code == status, response.text
    assert cause in str(response.json()["detail"])


def test_a_body_over_the_limit_is_refused_413_declared_or_streamed(client):
    big = png((8, 8)) + b"\0" * 300_000
    response = client.post("/query", files=[("images", ("big.png", big, "image/png"))])
    assert response.status_code == 413 and "over the limit of 200,000 bytes" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        yield b"--x\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(40):
            yield b"\0" * 10_000

    response = client.post("/query", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413 and "over the limit" in response.json()["detail"]
    assert client.get("/health").status_code == 200


def test_the_server_survives_a_failing_model_pass(config, bundle, queries):
    index = Index(bundle, "cpu")
    real = index.describe_batch
    index.describe_batch = lambda batch: (_ for _ in ()).throw(RuntimeError("out of memory"))
    with TestClient(create_app(config, index), raise_server_exceptions=False) as client:
        failed = client.post("/query", files=[upload(queries[0])])
        assert failed.status_code == 500 and "RuntimeError" in failed.json()["detail"]
        index.describe_batch = real
        assert client.post("/query", files=[upload(queries[0])]).status_code == 200


def test_token_guards_the_api_but_not_the_page_or_health(config, bundle, queries):
    app = create_app(replace(config, token=TOKEN), Index(bundle, "cpu"))
    with TestClient(app) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = client.get("/info", headers=headers)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            assert "bearer token" in response.json()["detail"]
        assert client.post("/query", files=[upload(queries[0])]).status_code == 401
        assert client.get("/images/0").status_code == 401
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/info", headers=good).status_code == 200
        assert client.post("/query", files=[upload(queries[0])], headers=good).status_code == 200
        for public in ("/", "/health", "/static/app.js", "/openapi.json"):
            assert client.get(public).status_code == 200


def gated_app(config: ServeConfig, bundle) -> tuple:
    """An app whose model passes wait for a gate, recording each pass's batch size."""
    index, gate, sizes = Index(bundle, "cpu"), threading.Event(), []
    real = index.describe_batch

    def describe(batch):
        sizes.append(len(batch))
        assert gate.wait(30)
        return real(batch)

    index.describe_batch = describe
    return create_app(config, index), gate, sizes


async def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def concurrent_queries(app, gate, sizes, files: list, n: int) -> list[httpx.Response]:
    """One request holds the model thread; `n` more arrive meanwhile; then the gate opens."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://vpr") as client:
        first = asyncio.create_task(client.post("/query", files=[files[0]], data={"k": "2"}))
        await wait_for(lambda: len(sizes) == 1)
        rest = [asyncio.create_task(client.post("/query", files=[f], data={"k": str(1 + i % 3)}))
                for i, f in enumerate(files[1:n + 1])]
        await wait_for(lambda: app.state.batcher.waiting == n)
        gate.set()
        return await asyncio.gather(first, *rest)


@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_requests_share_one_forward_pass_unless_batching_is_off(config, bundle, queries, batching):
    app, gate, sizes = gated_app(replace(config, batching=batching, batch_window_ms=1), bundle)
    files = [upload(q) for q in queries[:6]]
    responses = asyncio.run(concurrent_queries(app, gate, sizes, files, 5))
    assert [r.status_code for r in responses] == [200] * 6
    assert sizes == ([1, 5] if batching else [1] * 6)
    expected = Index(bundle, "cpu").query(queries[:6], k=3)
    for i, (response, want) in enumerate(zip(responses, expected)):
        k = 2 if i == 0 else 1 + (i - 1) % 3
        got = response.json()["results"][0]["matches"]
        assert [m["id"] for m in got] == [m.id for m in want.matches[:k]]


def test_a_batch_holds_at_most_max_batch_images(config, bundle, queries):
    app, gate, sizes = gated_app(replace(config, max_batch=2, batch_window_ms=1), bundle)
    responses = asyncio.run(concurrent_queries(app, gate, sizes, [upload(q) for q in queries[:6]], 5))
    assert [r.status_code for r in responses] == [200] * 6 and sizes == [1, 2, 2, 1]


def test_too_many_requests_in_flight_get_503_with_retry_after(config, bundle, queries):
    app, gate, sizes = gated_app(replace(config, max_in_flight=1), bundle)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://vpr") as client:
            first = asyncio.create_task(client.post("/query", files=[upload(queries[0])]))
            await wait_for(lambda: len(sizes) == 1)
            busy = await client.post("/query", files=[upload(queries[1])])
            health = await client.get("/health")
            gate.set()
            return await first, busy, health

    first, busy, health = asyncio.run(scenario())
    assert first.status_code == 200 and health.status_code == 200
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and "busy" in busy.json()["detail"]


def test_is_loopback():
    assert all(map(is_loopback, ("127.0.0.1", "localhost", "::1", "127.0.0.2")))
    assert not any(map(is_loopback, ("0.0.0.0", "192.168.1.4", "::", "example.org")))


def test_cli_warns_when_it_binds_beyond_localhost_without_a_token(monkeypatch, capsys, index_dir):
    import vpr.serve

    calls = []
    monkeypatch.setattr(vpr.serve, "serve", lambda config, **kwargs: calls.append((config, kwargs)))
    code, _, err = run_cli(monkeypatch, capsys, "serve", "--index", index_dir, "--host", "0.0.0.0", "--port", "8123",
                           "--device", "cpu", "--no-batching", "--max-upload-mb", "1")
    assert code == 0 and "warning: --host 0.0.0.0 without --token" in err
    config, kwargs = calls[0]
    on_ready = kwargs.pop("on_ready")
    assert kwargs == {"host": "0.0.0.0", "port": 8123, "workers": 1}
    on_ready({"random_init": True})  # once the index loaded and the port is bound: the random-weights warning
    assert "has random weights" in capsys.readouterr().err
    assert (config.batching, config.max_body_bytes, config.token) == (False, 1024 * 1024, None)
    monkeypatch.setenv("VPR_TOKEN", TOKEN)
    code, _, err = run_cli(monkeypatch, capsys, "serve", "--index", index_dir, "--host", "0.0.0.0")
    assert code == 0 and "warning" not in err and calls[1][0].token == TOKEN


def test_cli_refuses_a_missing_index_in_one_line(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "serve", "--index", tmp_path / "nothing", "--device", "cpu")
    assert code == 1 and err.strip().count("\n") == 0 and "no index here" in err


def test_workers_share_the_settings_through_the_environment(config, monkeypatch):
    monkeypatch.setenv("VPR_SERVE_CONFIG", "")  # restored (removed) after the test
    replace(config, token=TOKEN, max_k=7).to_env()
    assert ServeConfig.from_env() == replace(config, token=TOKEN, max_k=7)
