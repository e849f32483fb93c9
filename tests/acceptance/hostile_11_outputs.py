"""Hostile inputs of issue 11, the cases about outputs: paths that are not vpr's, training runs, two builds at
once, interrupted builds, resume and an immutable index (run by `hostile_11.py`)."""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path


from harness import (
    REFUSE, TIMEOUT_S, WORK, Case, Lab, build_args, changed, descriptors_by_path, differing, finish,
    run, snapshot, start, survived, user_folder, write_places,
)
from vpr.fileio import MARKER

# Data loss (cases 1-12).


def output_paths(lab: Lab) -> list[Case]:
    """Cases 1-9: `build-index --out` aimed at the user's folders and files."""
    base = lab.root / "out"
    cases = []
    mine = user_folder(base / "mine")
    before = snapshot(mine)
    cases.append(lab.case("1", "--out: existing folder of user files", run(build_args(lab.db, mine)), REFUSE,
                          intact=survived(before, mine)))
    for id, name, target in (("2", "--out: the database folder", "database"), ("3", "--out: the database's parent", "")):
        city = write_places(base / f"city{id}", 3, seed=int(id))
        before = snapshot(city)
        result = run(build_args(city / "database", city / target))
        cases.append(lab.case(id, name, result, REFUSE, intact=survived(before, city)))
    run_dir = base / "runs" / "x"
    run_dir.mkdir(parents=True)
    for name in ("last.pt", "best.pt", "log.jsonl", "config.json"):
        (run_dir / name).write_text(name)
    before = snapshot(run_dir)
    cases.append(lab.case("4", "--out: a training run folder", run(build_args(lab.db, run_dir)), REFUSE,
                          intact=survived(before, run_dir)))
    siblings = [user_folder(base / "s5" / "idx.tmp-mine"), user_folder(base / "s5" / "idx.old-x")]
    before = snapshot(*siblings)
    result = run(build_args(lab.db, base / "s5" / "idx"))
    cases.append(lab.case("5", "user folders OUT.tmp-mine, OUT.old-x beside --out", result, WORK,
                          intact=survived(before, *siblings)))
    globbed = [user_folder(base / "t" / "a"), user_folder(base / "t" / "b")]
    before = snapshot(*globbed)
    result = run(build_args(lab.db, base / "t" / "[ab]"))
    cases.append(lab.case("6", "--out 't/[ab]' beside user folders t/a, t/b", result, WORK,
                          intact=survived(before, *globbed)))
    work = base / "w7"
    user_folder(work / ".tmp-x")
    before = snapshot(work)
    result = run(build_args(lab.db, "."), cwd=work)
    cases.append(lab.case("7", "--out . in a folder holding a user folder .tmp-x", result, REFUSE,
                          intact=survived(before, work), cwd=str(work)))
    report = base / "f8" / "report.txt"
    report.parent.mkdir()
    report.write_text("mine")
    before = snapshot(report)
    cases.append(lab.case("8", "--out: a user file", run(build_args(lab.db, report)), REFUSE,
                          intact=survived(before, report)))
    cache = base / "c9" / "idx.cache"
    cache.parent.mkdir()
    cache.write_text("also mine")
    before = snapshot(cache)
    result = run(build_args(lab.db, base / "c9" / "idx"))
    cases.append(lab.case("9", "a user file at OUT.cache", result, REFUSE, intact=survived(before, cache),
                          out_created=(base / "c9" / "idx").exists()))
    return cases


def training_outputs(lab: Lab) -> list[Case]:
    """Cases 10-11: `train --out` on a run whose last.pt is gone, and `groups --cache` naming a user file."""
    run_dir = lab.root / "train10" / "run"
    run_dir.mkdir(parents=True)
    for name in ("best.pt", "config.json", "log.jsonl"):
        (run_dir / name).write_text("{}" if name == "config.json" else name)
    args = ["train", "--method", "cosplace", "--dataset", str(lab.city), "--out", str(run_dir), "--epochs", "1",
            "--device", "cpu", "--workers", "0"]
    cases = []
    for id, extra in (("10a", []), ("10b", ["--resume"])):
        before = snapshot(run_dir)
        result = run(args + extra)
        cases.append(lab.case(id, f"train --out: a run without last.pt{' (--resume)' if extra else ''}", result,
                              REFUSE, intact=survived(before, run_dir)))
    cache = lab.root / "groups11" / "notes.h5"
    cache.parent.mkdir()
    cache.write_text("my notes")
    before = snapshot(cache)
    result = run(["groups", str(lab.db), "--cache", str(cache)])
    cases.append(lab.case("11", "groups --cache: a user file", result, REFUSE, intact=survived(before, cache)))
    return cases


def concurrent_builds(lab: Lab) -> list[Case]:
    """Case 12: two builds at once on one --out (images in opposite orders), then a build from their cache."""
    base = lab.root / "race"
    images = sorted((write_places(base / "city", 16, seed=7, queries=False) / "database").iterdir())
    manifests = []
    for name, order in (("forward", images), ("backward", images[::-1])):
        rows = [f"{p},{p.name.split('@')[1]},{p.name.split('@')[2]}" for p in order]
        manifests.append(base / f"{name}.csv")
        manifests[-1].write_text("path,utm_east,utm_north\n" + "\n".join(rows) + "\n")
    index = base / "idx"
    both = [build_args(m, index, "--batch-size", "2") for m in manifests]
    processes = [start(args) for args in both]
    first, second = [finish(p, args) for p, args in zip(processes, both)]
    raced = descriptors_by_path(index)
    cached = run(build_args(manifests[1], index, "--batch-size", "2"))
    reference = run(build_args(manifests[0], base / "fresh", "--batch-size", "2", "--no-cache"))
    fresh = descriptors_by_path(base / "fresh")
    found = re.search(r"(\d+) from cache", cached.stdout)
    reused = int(found.group(1)) if found else None
    raced_differ, problems = differing(raced, fresh), first.problems() + second.problems()
    race = Case(
        id="12a", name="two builds at once, same --out, images in opposite orders",
        command=lab.short(f"{shlex.join(['vpr', *both[0]])} & {shlex.join(['vpr', *both[1]])}"),
        exit=f"{first.code} & {second.code}", first_line=lab.short(first.first_line),
        message=lab.short(f"{first.message} | {second.message}"),
        checks={"descriptors_differing_from_no_cache_build": raced_differ, "no_cache_build_exit": reference.code},
        problems=problems,
        as_expected=first.code == second.code == reference.code == 0 and raced_differ == 0 and not problems,
    )
    rebuilt = differing(descriptors_by_path(index), fresh)
    return [race, lab.case("12b", "third build of the same --out, from the shared cache", cached, WORK,
                           ok=rebuilt == 0 and reused == len(images), reused_from_cache=reused,
                           descriptors_differing_from_no_cache_build=rebuilt)]


# Resume, interruptions and an immutable index (cases 12b, 35, 43, 44).

def train_resume(lab: Lab) -> list[Case]:
    """Case 35: `train --resume` with a corrupt config.json (last.pt present), then with none."""
    from vpr.training.run import RunDir

    run_dir = RunDir(lab.root / "train35" / "run")
    run_dir.prepare({"a": 1}, resume=False, inputs=[])  # a marked run folder, as `vpr train` makes
    run_dir.last.write_bytes(b"x")
    run_dir.config.write_text("{not json")
    args = ["train", "--method", "cosplace", "--dataset", str(lab.city), "--out", str(run_dir.root), "--resume",
            "--epochs", "1", "--device", "cpu", "--workers", "0"]
    cases = []
    for id, name in (("35a", "train --resume, corrupt config.json"), ("35b", "train --resume, config.json missing")):
        if id == "35b":
            run_dir.config.unlink()
        before = snapshot(run_dir.root)
        result = run(args)
        cases.append(lab.case(id, name, result, REFUSE, intact=survived(before, run_dir.root)))
    return cases


def interrupt(lab: Lab) -> list[Case]:
    """Case 43: SIGINT while build-index extracts ~200 images."""
    base = lab.root / "sigint"
    write_places(base, 200, seed=4, queries=False)
    out = base / "idx"
    args = build_args(base / "database", out, "--batch-size", "2")
    process = start(args)
    deadline = time.monotonic() + TIMEOUT_S
    while not (base / "idx.cache" / MARKER).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the descriptor cache appears just before extraction starts
    signalled = process.poll() is None
    if signalled:
        process.send_signal(signal.SIGINT)
    result = finish(process, args)
    return [lab.case("43", "SIGINT during build-index of 200 images", result, {130},
                     ok=signalled and result.stderr == "interrupted\n" and not out.exists(),
                     signalled_while_running=signalled, out_created=out.exists())]


def immutable_index(lab: Lab) -> list[Case]:
    """Case 44: a failed rebuild over a read-only (immutable) index leaves the index as it was and no temporaries."""
    from vpr.retrieval.store import is_vpr_index

    base = lab.root / "immutable"
    out = base / "idx"
    command = f"chattr +i {out}; {shlex.join(['vpr', *build_args(lab.db, out, '--no-cache')])}"
    if shutil.which("chattr") is None:
        return [lab.note("44", "rebuild over a read-only index", command, "not reproducible as root: no chattr", ok=None)]
    shutil.copytree(lab.index, out)
    locked = subprocess.run(["chattr", "+i", str(out)], capture_output=True, text=True)
    if locked.returncode != 0:
        why = (locked.stderr.strip() or "chattr +i failed").splitlines()[0]
        return [lab.note("44", "rebuild over a read-only index", command, f"not reproducible as root: {why}", ok=None)]
    try:
        before = snapshot(out)
        result = run(build_args(lab.db, out, "--no-cache"))
        lost = changed(before, out)
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)
    leftovers = sorted(p.name for p in base.iterdir() if p.name.startswith(("idx.tmp-", "idx.old-")))
    case = lab.case("44", "rebuild over an immutable index (chattr +i)", result, REFUSE, intact=not lost,
                    ok=not leftovers, leftovers=leftovers, changed=[Path(p).name for p in lost],
                    still_a_vpr_index=is_vpr_index(out))
    case.command = lab.short(command)
    return [case]
