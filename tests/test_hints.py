"""A hint names only flags its command accepts: the library's advice is said as the user's command's flags, and an
alternative that only another command takes ("or build with --skip-bad" on `vpr query`) is left out."""

import re

import pytest

from cli import eval_cmd, interop_cmds, retrieval_cmds
from cli.flags import as_flags, flag_table
from conftest import run_cli

COMMANDS = {"query": retrieval_cmds.query_cmd, "eval": eval_cmd.eval_cmd, "build-index": retrieval_cmds.build_index_cmd,
            "pairs": interop_cmds.pairs_cmd}
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])\b")


def accepted(command) -> set[str]:
    return {flag for on, off in flag_table(command).values() for flag in (on, off) if flag and flag.startswith("-")}


@pytest.fixture()
def corrupt(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "@550000.00@4180000.00@10@S@@@@@@@@@@@@.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return folder


def test_every_flag_a_corrupt_image_error_names_is_the_commands_own(corrupt, places_index, tmp_path, monkeypatch, capsys):
    photo = next(corrupt.iterdir())
    runs = {
        "query": ("query", photo, "--index", places_index),
        "eval": ("eval", corrupt, "--index", places_index),
        "build-index": ("build-index", corrupt, "--out", tmp_path / "idx", "--model", "pixels", "--head", "patchnorm"),
        "pairs": ("pairs", corrupt, "--index", places_index, "--out", tmp_path / "pairs.txt"),
    }
    for name, args in runs.items():
        code, _, err = run_cli(monkeypatch, capsys, *args, "--device", "cpu")
        assert code != 0 and photo.name in err and len(err.strip().splitlines()) == 1, (name, err)
        named = set(FLAG.findall(err))
        assert named <= accepted(COMMANDS[name]), (name, err)
        assert ("--skip-bad" in err) == (name == "build-index"), (name, err)
    assert not (tmp_path / "idx").exists() and not (tmp_path / "pairs.txt").exists()


def test_an_alternative_for_another_command_is_left_out_and_the_rest_are_said_as_flags():
    own = {"skip_bad": ("--skip-bad", None), "k": ("-k", None)}
    message = "x.jpg: corrupt; re-copy or remove it, or build with `skip_bad`"
    assert as_flags(message, own) == "x.jpg: corrupt; re-copy or remove it, or build with --skip-bad"
    assert as_flags(message, {"k": ("-k", None)}) == "x.jpg: corrupt; re-copy or remove it"
    assert as_flags("`k=0`: must be at least 1; or use `nprobe`", own) == "-k 0: must be at least 1"
