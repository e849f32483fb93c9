"""The harness of the hostile-input acceptance scripts (`hostile_11.py`, `hostile_23.py`): run the real `vpr`
CLI in subprocesses inside a temporary folder, record each case's exit code, first line of output, whether the
user's files survived byte for byte and the case's own checks, and print them as a Markdown table (and JSON).

Run a script with the interpreter whose `vpr` it should test; `PYTHONPATH=OTHER_CHECKOUT` measures another
checkout of the code (the "before" column of a closing note).
"""


from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
from PIL import Image

from vpr.data.geo import format_at_name

VPR_SCRIPT = Path(sys.executable).with_name("vpr")
VPR = [str(VPR_SCRIPT)] if VPR_SCRIPT.exists() else [sys.executable, "-c", "from cli.app import main; main()"]
TINY = ["--resize", "48x64", "--dim", "64", "--workers", "0", "--device", "cpu"]
TIMEOUT_S = 300
WORK = {0}
REFUSE = {1, 2}  # a runtime error (1) or a usage error (2), as one message
USAGE = {2}


@dataclass
class Result:
    """One finished `vpr` run."""

    args: list[str]
    code: int
    stdout: str
    stderr: str

    @property
    def usage_error(self) -> bool:
        """Click's usage block: `Usage: ...`, a hint, a blank line and `Error: ...`."""
        return self.stderr.startswith("Usage:")

    @property
    def first_line(self) -> str:
        lines = [line for line in (self.stderr or self.stdout).splitlines() if line.strip()]
        return lines[0] if lines else ""

    @property
    def message(self) -> str:
        """The line that says what happened: click's `Error:` line for usage errors, else the first line."""
        if self.usage_error:
            return next((line for line in self.stderr.splitlines() if line.startswith("Error:")), self.first_line)
        return self.first_line

    def problems(self) -> list[str]:
        found = []
        if "Traceback" in self.stderr:
            found.append("traceback")
        if "unexpected" in self.stderr:
            found.append("'unexpected' error")
        said = [x for x in self.stderr.splitlines() if x.strip() and not x.startswith(("WARNING ", "warning: ", "note: "))]
        if self.code != 0 and not self.usage_error and len(said) > 1:  # a warning or note before the error is not part of it
            found.append("multi-line message")
        return found


@dataclass
class Case:
    """One row of the evidence table."""

    id: str
    name: str
    command: str
    exit: int | str
    first_line: str
    message: str
    intact: bool | None = None  # the user's files, byte for byte; None where nothing was at risk
    checks: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    as_expected: bool | None = None


@dataclass(frozen=True)
class Lab:
    """The temporary folder and what the cases share: a city (8 places) and an index of its database."""

    root: Path

    @property
    def city(self) -> Path:
        return self.root / "city"

    @property
    def db(self) -> Path:
        return self.city / "database"

    @property
    def index(self) -> Path:
        return self.root / "idx"

    def short(self, text: str) -> str:
        """`text` with the temporary folder shown as $TMP, printable as UTF-8."""
        return text.replace(str(self.root), "$TMP").encode("utf-8", "backslashreplace").decode("utf-8")

    def case(self, id: str, name: str, result: Result, expect: set[int], *, intact: bool | None = None,
             ok: bool = True, **checks: Any) -> Case:
        """A row for `result`: as expected when its exit code is in `expect`, `ok` holds, no files were lost
        and the output shows no problem."""
        problems = result.problems() + (["files changed"] if intact is False else [])
        return Case(
            id=id, name=name, command=self.short(shlex.join(["vpr", *result.args])), exit=result.code,
            first_line=self.short(result.first_line), message=self.short(result.message), intact=intact,
            checks={k: self.short(v) if isinstance(v, str) else v for k, v in checks.items()}, problems=problems,
            as_expected=result.code in expect and ok and intact is not False and not problems,
        )

    def note(self, id: str, name: str, command: str, line: str, *, ok: bool | None, **checks: Any) -> Case:
        """A row for a check that is not one CLI run (exit column '-')."""
        return Case(id=id, name=name, command=self.short(command), exit="-", first_line=self.short(line),
                    message=self.short(line), checks=checks, as_expected=ok)


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VPR_DEBUG"}
    return {**env, "OMP_NUM_THREADS": "1", **(extra or {})}


def decode(data: bytes) -> str:
    return data.decode("utf-8", "backslashreplace")


def run(args: list[str], env: dict[str, str] | None = None, stdin: str | None = None, *, cwd: Path | None = None) -> Result:
    """Run `vpr ARGS` in a subprocess with one torch thread; `env` adds variables, `stdin` is its input (none by default)."""
    done = subprocess.run([*VPR, *args], env=cli_env(env), input=(stdin or "").encode(), capture_output=True,
                          cwd=cwd, timeout=TIMEOUT_S)
    return Result(args, done.returncode, decode(done.stdout), decode(done.stderr))


def run_python(code: str, *args: str) -> Result:
    """Run a Python snippet (the library's API, as a user's script would call it) in a subprocess."""
    done = subprocess.run([sys.executable, "-c", code, *args], env=cli_env(), capture_output=True, timeout=TIMEOUT_S)
    return Result(["python", "-c", "...", *args], done.returncode, decode(done.stdout), decode(done.stderr))


def start(args: list[str]) -> subprocess.Popen:
    """Start `vpr ARGS` in the background (see `finish`)."""
    return subprocess.Popen([*VPR, *args], env=cli_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def finish(process: subprocess.Popen, args: list[str]) -> Result:
    stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    return Result(args, process.returncode, decode(stdout), decode(stderr))


def build_args(database: Path, out: Path | str, *extra: str) -> list[str]:
    return ["build-index", str(database), "--out", str(out), *TINY, *extra]


# Test data.

def write_places(folder: Path, count: int, seed: int, *, queries: bool = True) -> Path:
    """`count` places 100 m apart as `@`-named 64x48 JPEGs in FOLDER/database and, with `queries`, a noisy
    second view of each (3 m east, 2 m south) in FOLDER/queries; returns `folder`."""
    rng = np.random.default_rng(seed)
    (folder / "database").mkdir(parents=True)
    if queries:
        (folder / "queries").mkdir()
    for i in range(count):
        east, north = 550000.0 + 100.0 * i, 4180000.0 + 37.0 * (i % 3)
        coarse = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((64, 48), Image.BICUBIC)
        image.save(folder / "database" / format_at_name(east, north, 10, "S", heading=30.0 * i % 360), quality=95)
        if queries:
            noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 8.0, (48, 64, 3))
            name = format_at_name(east + 3.0, north - 2.0, 10, "S", heading=(30.0 * i + 5) % 360)
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / "queries" / name, quality=95)
    return folder


def user_folder(path: Path) -> Path:
    """A folder of the user's own files, with a sub-folder."""
    (path / "notes").mkdir(parents=True)
    (path / "thesis.txt").write_text("three years of work")
    (path / "notes" / "todo.md").write_text("- back up")
    return path


def snapshot(*roots: Path) -> dict[str, str]:
    """The sha256 of every file at or under `roots` (links not followed)."""
    found = {}
    for root in roots:
        for path in [root] if root.is_file() else sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def changed(before: dict[str, str], *roots: Path) -> list[str]:
    """The files of `before` that are gone or hold other bytes now."""
    after = snapshot(*roots)
    return [path for path, digest in before.items() if after.get(path) != digest]


def survived(before: dict[str, str], *roots: Path) -> bool:
    """Whether every file of `before` is still there with the same bytes."""
    return not changed(before, *roots)


def copy_images(source: Path, folder: Path, count: int) -> list[Path]:
    """The first `count` images of `source` copied into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(path, folder / path.name)) for path in sorted(source.iterdir())[:count]]


def descriptors_by_path(index: Path) -> dict[str, np.ndarray]:
    if not (index / "database.h5").is_file():
        return {}
    with h5py.File(index / "database.h5", "r") as f:
        return dict(zip(f["paths"].asstr()[:], f["descriptors"][:]))


def differing(found: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> int:
    """Paths whose descriptor differs from the reference's (atol 1e-5) or that only one side has."""
    changed = sum(not np.allclose(found[p], reference[p], rtol=0, atol=1e-5) for p in found.keys() & reference.keys())
    return changed + len(found.keys() ^ reference.keys())


def run_group(group: Callable[[Lab], list[Case]], lab: Lab) -> list[Case]:
    """The group's cases, or one row saying how the script itself failed in it."""
    try:
        return group(lab)
    except Exception as exc:  # a bug or timeout here must not lose the other groups' evidence
        return [lab.note(group.__name__, f"script error in {group.__name__}", "-", f"{type(exc).__name__}: {exc}", ok=False)]


def case_order(case: Case) -> tuple[int, str]:
    match = re.match(r"(\d+)(.*)", case.id)
    return (int(match.group(1)), match.group(2)) if match else (10**6, case.id)


def markdown(cases: list[Case]) -> str:
    def cell(value: Any) -> str:
        text = str(value).replace("|", "\\|").replace("\n", " ")
        return text if len(text) <= 160 else text[:157] + "..."

    rows = ["| # | case | exit | first line of output | files intact | checks | as expected |",
            "|---|---|---|---|---|---|---|"]
    for c in cases:
        intact = {None: "", True: "yes", False: "**NO**"}[c.intact]
        checks = "; ".join(f"{k}={v}" for k, v in c.checks.items())
        expected = {None: "n/a", True: "yes", False: "**NO**"}[c.as_expected]
        problems = f" ({', '.join(c.problems)})" if c.problems else ""
        rows.append(f"| {c.id} | {cell(c.name)} | {c.exit} | {cell(c.message)} | {intact} | {cell(checks)} | {expected}{problems} |")
    return "\n".join(rows)


def main(doc: str, groups: list[Callable[[Lab], list[Case]]], setup: Callable[[Lab], Case], default_out: str) -> None:
    """Run `setup` (the shared index), then every case group two at a time; print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(default_out), help="JSON file for the cases")
    parser.add_argument("--jobs", type=int, default=2, help="case groups run at once (each runs one CLI at a time)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder for inspection")
    args = parser.parse_args()
    os.umask(0o022)  # case 42 reads the modes this umask gives; the CLI runs inherit it
    started = time.perf_counter()
    lab = Lab(Path(tempfile.mkdtemp(prefix="vpr-hostile-")).resolve())
    try:
        cases = [setup(lab)]
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for found in pool.map(lambda group: run_group(group, lab), groups):
                cases.extend(found)
    finally:
        if args.keep:
            print(f"kept {lab.root}", file=sys.stderr)
        else:
            shutil.rmtree(lab.root, ignore_errors=True)
    cases.sort(key=case_order)
    args.out.write_text(json.dumps([asdict(c) for c in cases], indent=2) + "\n")
    print(markdown(cases))
    odd = [c for c in cases if c.as_expected is False or c.problems]
    print(f"\n{len(cases)} cases, {len(odd)} not as expected{': ' + ', '.join(c.id for c in odd) if odd else ''}; "
          f"{time.perf_counter() - started:.0f} s; JSON in {args.out}")

