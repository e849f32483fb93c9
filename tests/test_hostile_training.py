"""Training runs under attack: a diverging run never replaces a healthy checkpoint, another tool's run folder
is never touched, and a doctored log or absurd learning rate is a one-line error."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from test_cosplace import city, tiny_config  # noqa: F401  (the module-scoped tiny city fixture)
from vpr.errors import CheckpointError, TrainingError, UsageError
from vpr.models.checkpoints import load_checkpoint
from vpr.training.cosplace import train_cosplace


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def strict_json_lines(path: Path) -> list[dict]:
    """log.jsonl read as strict JSON: NaN and Infinity are refused."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("broken", ["weights", "loss"])
def test_a_run_that_diverges_stops_before_replacing_its_healthy_checkpoints(city, tmp_path, monkeypatch, broken):  # noqa: F811
    """Epoch 2 ends with NaN weights (or a NaN loss), as a too-high learning rate leaves them: the run stops with
    one line, and last.pt, best.pt and log.jsonl still hold epoch 1."""
    from vpr.training.cosplace import CosPlaceMethod

    out = tmp_path / "run"
    train_cosplace(tiny_config(city, out, epochs=1, iterations_per_epoch=1))
    healthy = digests(out)
    original = CosPlaceMethod.train_epoch

    def diverging(self, epoch, phase):
        record = original(self, epoch, phase)
        if broken == "loss":
            return {**record, "loss": float("nan")}
        with torch.no_grad():
            self.model.head.fc.weight.fill_(float("nan"))
        return record

    monkeypatch.setattr(CosPlaceMethod, "train_epoch", diverging)
    with pytest.raises(TrainingError, match=r"epoch 2: .*diverged; .*last\.pt still holds epoch 1; .*lower lr") as info:
        train_cosplace(tiny_config(city, out, epochs=3, iterations_per_epoch=1), resume=True)
    assert "\n" not in str(info.value)
    after = digests(out)
    assert after["last.pt"] == healthy["last.pt"] and after["best.pt"] == healthy["best.pt"]
    assert [r["epoch"] for r in strict_json_lines(out / "log.jsonl")] == [1]
    model, _ = load_checkpoint(out / "last.pt")
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())


@pytest.mark.parametrize("lr", [3.0, 1000.0])
def test_a_new_run_that_diverges_writes_no_checkpoint(city, tmp_path, lr):  # noqa: F811
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="epoch 1: .*diverged; no checkpoint was written"):
        train_cosplace(tiny_config(city, out, epochs=2, iterations_per_epoch=2, lr=lr))
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()


@pytest.mark.parametrize("option", ["lr", "classifier_lr"])
def test_a_learning_rate_that_overflows_float32_is_refused_before_any_work(city, tmp_path, option):  # noqa: F811
    with pytest.raises(UsageError, match="must be a positive number up to 1000"):
        train_cosplace(tiny_config(city, tmp_path / "run", **{option: 1e38}))
    assert not (tmp_path / "run").exists()


def test_resume_on_another_tools_run_folder_writes_nothing(city, tmp_path):  # noqa: F811
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text(json.dumps({"method": "cosplace", "lr": 0.1}))
    torch.save({"model": torch.zeros(3)}, theirs / "last.pt")
    before = digests(theirs)
    with pytest.raises((CheckpointError, UsageError)) as info:
        train_cosplace(tiny_config(city, theirs), resume=True)
    assert "\n" not in str(info.value) and re.search(r"\bout\b", str(info.value))
    assert digests(theirs) == before and sorted(p.name for p in theirs.iterdir()) == ["config.json", "last.pt"]


def test_resume_refuses_a_config_of_another_tool_without_touching_it(city, tmp_path):  # noqa: F811
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text(json.dumps({"lr": 0.1, "epochs": 3}))
    torch.save({"model": torch.zeros(3)}, theirs / "last.pt")
    before = digests(theirs)
    with pytest.raises(UsageError, match="not the settings of a vpr cosplace run"):
        train_cosplace(tiny_config(city, theirs), resume=True)
    assert digests(theirs) == before


def test_a_log_line_that_is_json_but_not_a_record_does_not_break_resume(city, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    train_cosplace(tiny_config(city, out, epochs=1, iterations_per_epoch=1))
    with open(out / "log.jsonl", "a") as log:
        log.write("[1, 2]\n\"text\"\n{\"epoch\": \"x\"}\n")
    result = train_cosplace(tiny_config(city, out, epochs=2, iterations_per_epoch=1), resume=True)
    assert result.best_epoch >= 1
    assert [r["epoch"] for r in strict_json_lines(out / "log.jsonl")] == [1, 2]
