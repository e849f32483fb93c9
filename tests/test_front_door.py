"""One front door: the CLI, `vpr serve` and the measurement scripts reach the library through `vpr.api` alone; a
photo gets one descriptor and one result shape through every command; the library's messages name parameters,
never CLI flags; and `vpr --help` starts without torch or FAISS."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import run_cli
from vpr.api import Index
from vpr.data.datasets import load_image_set
from vpr.serve import ServeConfig, create_app

ROOT = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w-])--[a-z]")


def vpr_imports(source: str) -> set[str]:
    """The vpr modules a file imports, at any depth (`from vpr import api` counts as vpr.api)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "vpr"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vpr":
            found |= {f"vpr.{alias.name}" for alias in node.names} if node.module == "vpr" else {node.module}
    return found - {"vpr.__version__"}  # the package's own version


def test_the_cli_reaches_the_library_only_through_the_api_errors_and_serve():
    imported = {path.name: vpr_imports(path.read_text()) for path in (ROOT / "cli").glob("*.py")}
    assert imported and all(modules <= {"vpr.api", "vpr.errors", "vpr.serve"} for modules in imported.values()), imported
    assert set().union(*imported.values()) >= {"vpr.api", "vpr.errors"}


def test_serve_and_the_measurement_scripts_use_only_the_api():
    for path in (ROOT / "vpr" / "serve").glob("*.py"):
        outside = {m for m in vpr_imports(path.read_text()) if not m.startswith("vpr.serve")}
        assert outside <= {"vpr.api", "vpr.errors"}, (path.name, outside)
    scripts = sorted((ROOT / "docs" / "measurements").glob("*.py"))
    assert len(scripts) >= 5
    for path in scripts:
        text = path.read_text()
        assert vpr_imports(text) <= {"vpr.api"}, path.name
        snippets = re.findall(r"from vpr[\w.]* import [\w, ]+|import vpr[\w.]*", text)  # also in subprocess scripts
        assert all(s.startswith(("from vpr import api", "from vpr.api import")) for s in snippets), (path.name, snippets)


def flags_in_messages(source: str) -> list[str]:
    """CLI flags (`--name`) in the text of raised errors, error constructors and warnings of a module."""
    hits: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        parts = [node.exc] if isinstance(node, ast.Raise) and node.exc is not None else []
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            parts += [node] if name.endswith("Error") or name in ("warn", "warning") else []
        hits |= {c.value for part in parts for c in ast.walk(part)
                 if isinstance(c, ast.Constant) and isinstance(c.value, str) and FLAG.search(c.value)}
    return sorted(hits)


def test_no_library_message_names_a_cli_flag():
    assert flags_in_messages('raise UsageError(f"{x}: use --pca-dim")') == [": use --pca-dim"]  # the check can fail
    assert flags_in_messages('log.warning("pass `pca_dim` 128")') == []
    found = {str(path.relative_to(ROOT)): hits for path in (ROOT / "vpr").rglob("*.py")
             if (hits := flags_in_messages(path.read_text()))}
    assert found == {}


def test_help_imports_neither_torch_nor_faiss():
    from cli.app import app

    commands = [command.name for command in app.registered_commands] + [group.name for group in app.registered_groups]
    script = (
        "import json, sys\nfrom cli.app import main\nloaded = {}\n"
        f"for argv in {[[]] + [[c] for c in commands]!r}:\n"
        "    sys.argv = ['vpr', *argv, '--help']\n"
        "    try:\n        main()\n    except SystemExit:\n        pass\n"
        "    loaded[' '.join(argv) or 'vpr'] = [m for m in ('torch', 'faiss', 'numpy', 'torchvision') if m in sys.modules]\n"
        "print(json.dumps(loaded))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(loaded) == len(commands) + 1 >= 10
    assert loaded == {name: [] for name in loaded}


@pytest.fixture(scope="module")
def photo(places):
    return load_image_set(places / "queries").paths[5]


@pytest.fixture(scope="module")
def index(places_index):
    return Index.load(places_index, device="cpu")


def serve_results(index_dir: Path, index: Index, photo: Path, k: int) -> list[dict]:
    config = ServeConfig(index=index_dir, device="cpu", allowed_hosts=("testserver",))
    with TestClient(create_app(config, index)) as client:
        response = client.post("/query", files=[("images", (str(photo), photo.read_bytes(), "image/jpeg"))],
                               data={"k": str(k)})
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_a_photo_gets_the_same_descriptor_through_every_command(places, places_index, index, photo, tmp_path,
                                                                 monkeypatch, capsys):
    described = index.describe([photo])[0]
    database = np.asarray(index.bundle.descriptors)
    expected = sorted(((float(database[i] @ described), i) for i in range(len(database))), reverse=True)[:3]

    def same_as_described(matches: list[dict]) -> None:
        assert [m["id"] for m in matches] == [i for _, i in expected]
        assert [m["similarity"] for m in matches] == pytest.approx([s for s, _ in expected], abs=1e-5)

    same_as_described([m.to_dict() for m in index.query(photo, k=3)[0].matches])  # Index.query
    code, out, err = run_cli(monkeypatch, capsys, "query", photo, "--index", places_index, "-k", 3, "--json",
                             "--device", "cpu")
    assert code == 0, err
    same_as_described(json.loads(out)[0]["matches"])  # vpr query
    same_as_described(serve_results(places_index, index, photo, 3)[0]["matches"])  # vpr serve

    saved = tmp_path / "queries.h5"
    code, _, err = run_cli(monkeypatch, capsys, "eval", places / "queries", "--index", places_index,
                           "--save-descriptors", saved, "--device", "cpu", "--workers", 0)
    assert code == 0, err
    with h5py.File(saved) as f:
        row = [Path(p.decode()) for p in f["paths"][:]].index(photo)
        assert f["descriptors"][row] == pytest.approx(described, abs=1e-5)  # vpr eval

    rebuilt = tmp_path / "queries-index"
    code, _, err = run_cli(monkeypatch, capsys, "build-index", places / "queries", "--out", rebuilt, "--checkpoint",
                           places_index / "model.pt", "--no-cache", "--device", "cpu", "--workers", 0)
    assert code == 0, err
    rows = Index.load(rebuilt, device="cpu").bundle
    assert rows.descriptors[[Path(p) for p in rows.database.paths].index(photo.resolve())] == pytest.approx(described, abs=1e-5)


def test_query_eval_serve_and_json_give_one_result_shape(places, places_index, index, photo, tmp_path, monkeypatch,
                                                         capsys):
    api_result = index.query(photo, k=4)[0].to_dict()
    code, out, err = run_cli(monkeypatch, capsys, "query", photo, "--index", places_index, "-k", 4, "--json",
                             "--device", "cpu")
    assert code == 0, err
    cli_result = json.loads(out)[0]
    served = serve_results(places_index, index, photo, 4)[0]
    predictions = tmp_path / "predictions.json"
    code, _, err = run_cli(monkeypatch, capsys, "eval", places / "queries", "--index", places_index, "--recall", "1,4",
                           "--save-predictions", predictions, "--device", "cpu", "--workers", 0)
    assert code == 0, err
    evaluated = next(r for r in json.loads(predictions.read_text())["queries"] if r["query"] == str(photo))

    assert cli_result == api_result
    assert list(served) == list(api_result) and list(served["matches"][0]) == list(api_result["matches"][0])
    assert set(evaluated) >= set(api_result) and set(evaluated["matches"][0]) >= set(api_result["matches"][0])
    database = places / "database"
    assert [m["path"] for m in served["matches"]] == [Path(m["path"]).relative_to(database).as_posix()
                                                     for m in api_result["matches"]]  # no server-side paths exposed
    for match in served["matches"]:
        match["path"] = str(database / match["path"])
    for other in (served, evaluated):
        assert other["query"] == api_result["query"]
        for got, want in zip(other["matches"], api_result["matches"], strict=True):
            assert {key: got[key] for key in want if key != "similarity" and key != "distance"} == \
                   {key: value for key, value in want.items() if key != "similarity" and key != "distance"}
            assert (got["similarity"], got["distance"]) == pytest.approx((want["similarity"], want["distance"]), abs=1e-5)
        assert other["position"] == pytest.approx(api_result["position"], abs=1e-4)
    assert {"metres", "positive"} <= set(evaluated["matches"][0]) and "error_m" in evaluated
