"""Hostile inputs of issue 23: the before/after table of its closing note (backups named like leftovers,
half-swapped reads, stale cache rows, diverging runs, DNS rebinding, tiny uploads, a full disk, tampered files).

Every case runs the real `vpr` CLI (or, for the Python API cases, a user's script) in subprocesses inside a
temporary folder, on the tiny city of `harness.write_places`, and records the exit code, the first line of
output, whether the user's files survived byte for byte and the case's own checks. Run it once with the code
before the fix (`PYTHONPATH=OLD_CHECKOUT`) and once after:

    .venv/bin/python tests/acceptance/hostile_23.py [--out hostile_23.json] [--jobs 2] [--keep]

The full-disk cases mount a tmpfs (root only; marked not reproducible elsewhere). About 4 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from harness import (
    REFUSE, WORK, Case, Lab, build_args, descriptors_by_path, differing, main, run, run_python, snapshot,
    start, survived, user_folder, write_places,
)
from vpr.data.geo import format_at_name

READER = Path(__file__).with_name("generation_reader.py")


API_CALL = """import sys
from vpr.api import Index
from vpr.errors import VPRError
INDEX, Q = sys.argv[1], sys.argv[2]
try:
    print(len({call}))
except VPRError as exc:
    sys.exit(f"error: {{type(exc).__name__}}: {{exc}}")
"""


def training(lab: Lab) -> list[str]:
    """`vpr train` of a tiny CosPlace model on the tiny synthetic city (as the issue reproduced it)."""
    return ["train", "--method", "cosplace", "--dataset", str(lab.root / "train-city"), "--resize", "48x64", "--dim", "32",
            "--layer", "3", "--iterations-per-epoch", "2", "--batch-size", "8", "--min-images-per-class", "2",
            "--workers", "0", "--device", "cpu"]


def index_of(lab: Lab, name: str, *extra: str, database: Path | None = None) -> Path:
    out = lab.root / name
    result = run(build_args(database or lab.db, out, *extra))
    if result.code != 0:
        raise RuntimeError(f"could not build {name}: {result.stderr.strip()[:200]}")
    return out


def query_args(index: Path, image: Path, *extra: str) -> list[str]:
    return ["query", str(image), "--index", str(index), "--device", "cpu", "--json", *extra]


def a_query(lab: Lab) -> Path:
    return sorted((lab.city / "queries").iterdir())[0]


def data_loss(lab: Lab) -> list[Case]:
    """Cases 1-5: backups named like leftovers, a user's OUT.cache, another tool's run, a diverging run, folders."""
    base = lab.root / "loss"
    base.mkdir()
    cases = []
    backups = [index_of(lab, f"loss/city-idx.{name}") for name in ("old-2023", "tmp-test")]
    kept = [*backups, *[b.with_name(b.name + ".cache") for b in backups]]
    before = snapshot(*kept)
    run(build_args(lab.db, base / "city-idx"))
    result = run(build_args(lab.db, base / "city-idx"))  # the build, then a rebuild
    cases.append(lab.case("1", "rebuild beside the user's indexes city-idx.old-2023, city-idx.tmp-test (and caches)", result,
                          WORK, intact=survived(before, *kept)))
    mine = base / "c2" / "idx.cache"
    mine.mkdir(parents=True)
    with h5py.File(mine / "main.h5", "w") as f:
        f["measurements"] = np.arange(10)
    before = snapshot(mine)
    cases.append(lab.case("2", "a user folder OUT.cache holding main.h5", run(build_args(lab.db, base / "c2" / "idx")), REFUSE,
                          intact=survived(before, mine)))
    theirs = base / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text(json.dumps({"method": "cosplace", "lr": 0.1}))
    run_python("import torch, sys; torch.save({'model': torch.zeros(3)}, sys.argv[1])", str(theirs / "last.pt"))
    before = snapshot(theirs)
    train = training(lab)
    result = run([*train, "--out", str(theirs), "--resume"])
    cases.append(lab.case("3", "train --resume on another tool's run folder", result, REFUSE, intact=survived(before, theirs),
                          marker_added=(theirs / ".vpr-owned").exists()))
    for id, option, value in (("4a", "--lr", "3"), ("4b", "--lr", "1e30"), ("4c", "--classifier-lr", "1e38")):
        out = base / f"run{id}"
        result = run([*train, "--out", str(out), "--epochs", "3", option, value])
        log = (out / "log.jsonl").read_text() if (out / "log.jsonl").is_file() else ""
        finite = run_python("import sys, torch; from vpr.models.checkpoints import load_checkpoint\n"
                            "m, _ = load_checkpoint(sys.argv[1]); print(all(bool(torch.isfinite(t).all()) "
                            "for t in m.state_dict().values() if t.is_floating_point()))", str(out / "last.pt"))
        healthy = finite.stdout.strip() == "True" if (out / "last.pt").exists() else None
        cases.append(lab.case(id, f"train {option} {value} --epochs 3 (a diverging run)", result, REFUSE,
                              ok="NaN" not in log and healthy is not False, checkpoints=sorted(p.name for p in out.glob("*.pt")),
                              log_has_nan="NaN" in log, last_pt_finite=healthy))
    out = index_of(lab, "loss/idx5", "--no-cache")
    for name in ("skipped.txt", "pca.h5"):
        user_folder(out / name)
    before = snapshot(out / "skipped.txt", out / "pca.h5")
    cases.append(lab.case("5", "rebuild over an index holding the user's folders skipped.txt/, pca.h5/",
                          run(build_args(lab.db, out, "--no-cache")), REFUSE, intact=survived(before, out / "skipped.txt", out / "pca.h5")))
    return cases


def generations(lab: Lab) -> list[Case]:
    """Cases 6-7: a reader looping during rebuilds; two same-size images swapped keeping their mtimes."""
    out = index_of(lab, "gen/idx", "--no-cache")
    stop = lab.root / "gen" / "stop"
    reader = subprocess.Popen([sys.executable, str(READER), str(out), str(stop)], stdout=subprocess.PIPE, text=True)
    time.sleep(3)
    dims = ("32", "64")
    for i in range(16):
        run(build_args(lab.db, out, "--no-cache", "--dim", dims[i % 2]))
    stop.touch()
    report = json.loads(reader.communicate(timeout=120)[0] or "{}")
    bad = report.get("error_count", -1) + report.get("mixed", -1)
    first = (report.get("errors") or [f"{report.get('loads')} loads, none failed or mixed"])[0]
    cases = [lab.note("6", "a reader process loading the index during 16 rebuilds", f"python {READER.name} & 16 x vpr build-index",
                      first, ok=bad == 0, **report)]
    folder = lab.root / "gen" / "bmp"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        blob = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((64, 48), Image.BICUBIC)
        blob.save(folder / (format_at_name(550000.0 + 90 * i, 4180000.0, 10, "S")[:-4] + ".bmp"))
    a, b = sorted(folder.iterdir())
    run(build_args(folder, lab.root / "gen" / "bmp-idx"))
    stamps = [(p.stat().st_atime_ns, p.stat().st_mtime_ns) for p in (a, b)]
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    for path, stamp in zip((a, b), stamps):
        os.utime(path, ns=stamp)
    result = run(build_args(folder, lab.root / "gen" / "bmp-idx", "--json"))
    fresh = run(build_args(folder, lab.root / "gen" / "bmp-fresh", "--no-cache"))
    stale = differing(descriptors_by_path(lab.root / "gen" / "bmp-idx"), descriptors_by_path(lab.root / "gen" / "bmp-fresh"))
    cases.append(lab.case("7", "rebuild from the cache after two same-size BMPs swapped, mtimes kept", result, WORK,
                          ok=stale == 0 and fresh.code == 0, stale_rows=stale))
    return cases


def tampered(lab: Lab) -> list[Case]:
    """Cases 8, 14: files of an index altered or swapped, and malformed fields; each load must refuse."""
    cases = []
    query = a_query(lab)

    def altered(id: str, name: str, change, *extra: str) -> None:
        out = index_of(lab, f"tamper/{id}", "--no-cache", *extra)
        change(out)
        result = run(query_args(out, query))
        empty = result.code == 0 and json.loads(result.stdout)[0]["matches"] == []
        cases.append(lab.case(id, name, result, REFUSE, ok=not empty, empty_matches=empty))

    def pca(key: str, value):
        def change(out: Path) -> None:
            with h5py.File(out / "pca.h5", "a") as f:
                if value is None:
                    del f[key]
                else:
                    f[key][0] = value
        return change

    def manifest(key: str, value):
        def change(out: Path) -> None:
            data = json.loads((out / "manifest.json").read_text())
            data[key] = value
            (out / "manifest.json").write_text(json.dumps(data))
        return change

    def rows(value: float):
        def change(out: Path) -> None:
            with h5py.File(out / "database.h5", "a") as f:
                f["descriptors"][1] = value
        return change

    other = index_of(lab, "tamper/other", "--no-cache", "--pca-dim", "4", "--dim", "32")
    altered("8a", "NaN in pca.h5", pca("mean", np.nan), "--pca-dim", "4", "--dim", "32")
    altered("8b", "another index's database.h5 (same sizes)", lambda out: (out / "database.h5").write_bytes(
        (other / "database.h5").read_bytes()), "--pca-dim", "4", "--dim", "32")
    altered("8c", "a descriptor row of 1e30 in database.h5", rows(1e30))
    altered("14a", "manifest zone [10.5, 'S']", manifest("zone", [10.5, "S"]))
    altered("14b", "manifest zone [99, 'S']", manifest("zone", [99, "S"]))
    altered("14c", "a deeply nested manifest.json", lambda out: (out / "manifest.json").write_text("[" * 100000 + "]" * 100000))
    altered("14d", "pca.h5 without its mean", pca("mean", None), "--pca-dim", "4", "--dim", "32")
    altered("14e", "database.h5 paths stored as integers", lambda out: _replace(out / "database.h5", "paths", np.arange(8)))
    altered("14f", "pca.h5 not HDF5", lambda out: (out / "pca.h5").write_bytes(b"\x89HDF" + b"\0" * 300),
            "--pca-dim", "4", "--dim", "32")
    return cases


def _replace(path: Path, key: str, data) -> None:
    with h5py.File(path, "a") as f:
        del f[key]
        f[key] = data


def omissions(lab: Lab) -> list[Case]:
    """Case 9: linked images, a featureless query, -k past a small index, whitening of 40 images, groups --map, the API."""
    cases = []
    linked = lab.root / "links"
    linked.mkdir()
    for path in sorted(lab.db.iterdir())[:4]:
        os.symlink(path, linked / path.name)
    (linked / "more").symlink_to(lab.db)
    (linked / format_at_name(551000.0, 4180000.0, 10, "S")).symlink_to(lab.root / "gone.jpg")
    result = run(build_args(linked, lab.root / "links-idx", "--skip-bad", "--json"))
    summary = json.loads(result.stdout) if result.code == 0 else {}
    cases.append(lab.case("9a", "a folder of linked images, a linked folder and a dangling link (--skip-bad)", result, WORK,
                          ok=summary.get("indexed") == 12 and summary.get("skipped") == 1, **summary))
    grey = lab.root / "grey.png"
    Image.new("RGB", (64, 48), (128, 128, 128)).save(grey)
    pixels = index_of(lab, "pixels-idx", "--model", "pixels", "--head", "patchnorm", "--resize", "16x32", "--no-cache")
    result = run(query_args(pixels, grey))
    position = json.loads(result.stdout)[0]["position"] if result.code == 0 else "?"
    cases.append(lab.case("9b", "a featureless (uniform grey) query", result, WORK, ok=position is None, position=position))
    forty = lab.root / "forty"
    write_places(forty, 40, seed=9, queries=False)
    result = run(build_args(forty / "database", lab.root / "forty-idx", "--pca-dim", "40", "--whiten", "--no-cache"))
    cases.append(lab.case("9d", "--pca-dim 40 --whiten on 40 images", result, REFUSE))
    own = write_places(lab.root / "groups-city", 4, seed=5, queries=False) / "database"  # its own copy: a map written
    inside = own / "map.png"  # among the images would break every later build of them
    cases.append(lab.case("9e", "groups --map into the dataset's image folder", run(["groups", str(own), "--map", str(inside)]),
                          REFUSE, ok=not inside.exists()))
    for id, call in (("9f", "Index.load(INDEX, device='cpu').query([Q, Q], names=['a'])"),
                     ("9g", "Index.load(INDEX, batch_size=-1, device='cpu').query([Q])")):
        result = run_python(API_CALL.format(call=call), str(lab.index), str(a_query(lab)))
        cases.append(lab.case(id, call, result, REFUSE, returned=result.stdout.strip()[:60]))
    return cases


def serving(lab: Lab) -> list[Case]:
    """Cases 10-11, 15c: a real `vpr serve`: a foreign Host, a tiny huge upload, a trickling client, a taken port."""
    cases = []
    strip_index = index_of(lab, "strip-idx", "--no-cache", "--resize", "16")
    port = _free_port()
    server = start(["serve", "--index", str(strip_index), "--device", "cpu", "--port", str(port)])
    try:
        _wait_for(port)
        status = _http(port, "GET /positions HTTP/1.1\r\nHost: rebind.attacker.example\r\n\r\n").split(" ", 2)[1]
        cases.append(lab.note("10", "GET /positions with Host: rebind.attacker.example", f"curl -H 'Host: ...' :{port}/positions",
                              f"HTTP {status}", ok=status == "400"))
        strip = lab.root / "strip.png"
        Image.new("L", (200_000, 1)).save(strip, optimize=True)
        tic = time.perf_counter()
        reply = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "120", "-F", f"images=@{strip}",
                                f"http://127.0.0.1:{port}/query"], capture_output=True, text=True).stdout
        seconds = time.perf_counter() - tic
        cases.append(lab.note("11a", f"a {strip.stat().st_size}-byte 200000x1 PNG, index --resize 16", "curl -F images=@strip.png /query",
                              f"HTTP {reply} in {seconds:.1f} s", ok=reply == "422" and seconds < 5, peak_mb=_peak_mb(server.pid)))
        tic = time.perf_counter()
        status = _trickle(port)
        cases.append(lab.note("11b", "a client sending one body byte every 0.5 s", "raw socket",
                              f"{status or 'no answer'} after {time.perf_counter() - tic:.0f} s", ok=status.startswith("HTTP/1.1 408")))
        result = run(["serve", "--index", str(strip_index), "--device", "cpu", "--port", str(port)])
        cases.append(lab.case("15c", "vpr serve on a port already in use", result, REFUSE))
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = run(["serve", "--index", str(strip_index), "--device", "cpu", "--host", "no-such-host.invalid", "--token", "t"])
    cases.append(lab.case("15d", "vpr serve --host that does not resolve", result, REFUSE))
    return cases


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(port: int) -> None:
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)


def _http(port: int, request: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request.encode())
        return conn.recv(4096).decode(errors="replace")


def _trickle(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(b"POST /query HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                     b"Content-Length: 100000\r\n\r\n--x\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a\"\r\n\r\n")
        conn.settimeout(0.5)
        start_time, reply = time.monotonic(), b""
        while time.monotonic() - start_time < 60 and b"\r\n" not in reply:
            try:
                conn.sendall(b"a")
                reply += conn.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                break
    return reply.decode(errors="replace").split("\r\n")[0]


def _peak_mb(pid: int) -> float | None:
    try:
        line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM"))
        return round(int(line.split()[1]) / 1024, 1)
    except (OSError, StopIteration):
        return None


def shells_and_disks(lab: Lab) -> list[Case]:
    """Cases 12-13, 15a-b: the pasted fix, a planted lock link, a full disk, a doctored log, join-anyloc."""
    cases = []
    ckpt = lab.root / "$(touch PWNED).ckpt"
    run_python("import argparse, sys, torch; torch.save({'state_dict': {'a': torch.ones(1)}, "
               "'hp': argparse.Namespace(lr=1)}, sys.argv[1])", str(ckpt))
    result = run(build_args(lab.db, lab.root / "ck-idx", "--checkpoint", str(ckpt)))
    command = result.stderr.strip().rsplit(": python", 1)[-1]
    subprocess.run(["bash", "-c", "python" + command], cwd=lab.root, capture_output=True)
    pwned = (lab.root / "PWNED").exists()
    cases.append(lab.case("12a", "pasting the 'keep only its weights' fix for $(touch PWNED).ckpt", result, REFUSE,
                          ok=not pwned, shell_ran_the_name=pwned))
    target = lab.root / "planted" / "file"
    target.parent.mkdir()
    (lab.root / ".lock-idx.lock").symlink_to(target)
    result = run(build_args(lab.db, lab.root / "lock-idx"))
    cases.append(lab.case("12b", "a dangling .OUT.lock link", result, REFUSE, ok=not target.exists(), target_created=target.exists()))
    disk = lab.root / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(disk)], capture_output=True).returncode != 0:
        cases.append(lab.note("13", "a full disk", "mount -t tmpfs", "not reproducible: mounting is not allowed", ok=None))
    else:
        try:
            cases += _full_disk(lab, disk)
        finally:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)
    run_dir = lab.root / "log-run"
    train = [*training(lab), "--out", str(run_dir)]
    run([*train, "--epochs", "1"])
    with open(run_dir / "log.jsonl", "a") as log:
        log.write("[1, 2]\n")
    cases.append(lab.case("15a", "train --resume after a log.jsonl line that is JSON but not an object",
                          run([*train, "--epochs", "2", "--resume"]), WORK))
    run_python("import sys, torch; torch.save({'blocks.foo': torch.zeros(3), 'pos_embed': torch.zeros(1, 1370, 1536)}, "
               "sys.argv[1]); torch.save(torch.zeros(32, 1536), sys.argv[2])", str(lab.root / "w.pth"), str(lab.root / "c.pt"))
    cases.append(lab.case("15b", "join-anyloc on a state dict with a key blocks.foo",
                          run(["join-anyloc", str(lab.root / "w.pth"), str(lab.root / "c.pt"), str(lab.root / "a.pth")]), REFUSE))
    return cases


def _full_disk(lab: Lab, disk: Path) -> list[Case]:
    cases = []
    small = ["--resize", "48x64", "--dim", "32", "--layer", "3", "--workers", "0", "--device", "cpu"]
    out = disk / "idx"
    run(["build-index", str(lab.db), "--out", str(out), *small])
    before = snapshot(out)
    for leave_kb in (4, 8, 24, 60, 2000):
        (disk / "filler").unlink(missing_ok=True)
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize // 1024
        (disk / "filler").write_bytes(b"\0" * max(0, free - leave_kb) * 1024)
        result = run(["build-index", str(lab.db), "--out", str(out), *small[:2], "--dim", "16", *small[4:]])
        cases.append(lab.case(f"13-{leave_kb}k", f"rebuild with {leave_kb} kB free on a tmpfs", result, REFUSE,
                              intact=survived(before, out)))
    return cases


def setup(lab: Lab) -> Case:
    """The shared city (8 places), its index, and a small training city."""
    write_places(lab.city, 8, seed=0)
    if run(["synth", str(lab.root / "train-city"), "--preset", "tiny"]).code != 0:
        sys.exit("vpr synth city --preset tiny failed")
    result = run(build_args(lab.db, lab.index))
    if result.code != 0:
        sys.exit(f"the shared index did not build: {result.stderr.strip()}")
    return lab.case("0", "the shared index", result, WORK)


GROUPS = [generations, serving, data_loss, tampered, omissions, shells_and_disks]

if __name__ == "__main__":
    main(__doc__, GROUPS, setup, "hostile_23.json")
