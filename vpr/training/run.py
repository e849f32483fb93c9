"""A training run's folder and its state: config.json, last.pt (with everything an exact resume needs), best.pt, log.jsonl.

`RunDir` holds the folder's safety rules (a new run needs a new or empty folder; `resume` only a vpr run of the same
method with the same settings); the checkpoint helpers save and reload the `training` entry of last.pt, RNG states
included, and `refuse_divergence` stops a run before a diverged epoch replaces a healthy checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vpr.errors import CheckpointError, TrainingError, UsageError
from vpr.fileio import (
    MARKER, atomic_file, check_replaceable_dir, check_separate, disk_full_errors, make_owned_dir, marker_kind, output_lock,
    to_json,
)
from vpr.models.checkpoints import load_payload, model_from_payload, save_checkpoint
from vpr.models.model import VPRModel
from vpr.models.pca import PCA


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) so runs are reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG state a trainer consumes, as tensors/lists (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]) + [random.getstate()[2] or 0],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    python = [int(v) for v in state["python"]]
    random.setstate((3, tuple(python[:-1]), None))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(state["numpy_pos"])))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


RUN_FILES = re.compile(r"config\.json|last\.pt|best\.pt|log\.jsonl|groups\.h5|clusters\.h5|\..+\.tmp-.*|" + re.escape(MARKER))
FREE_TO_CHANGE = ("epochs", "resume", "device", "workers")


@dataclass
class RunDir:
    """Paths of a training run directory."""

    root: Path

    @property
    def last(self) -> Path:
        return self.root / "last.pt"

    @property
    def best(self) -> Path:
        return self.root / "best.pt"

    @property
    def log(self) -> Path:
        return self.root / "log.jsonl"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    def is_run(self) -> bool:
        """Whether the directory is a run vpr wrote (its marker; runs of earlier versions: only run files)."""
        if marker_kind(self.root) == "run":
            return True
        names = os.listdir(self.root)
        return "config.json" in names and all(RUN_FILES.fullmatch(name) for name in names)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run's lock for a whole training call; a second process on the same run is refused."""
        with output_lock(self.root, wait=False):
            yield

    def check(self, config: dict, resume: bool, inputs: list[Path]) -> None:
        """Refuse, before any work, a folder a new run may not use or a run `resume` cannot continue.

        A new run needs a new or empty folder outside `inputs`; anything else is refused, never overwritten.
        """
        check_separate(self.root, inputs)
        if not resume:
            if self.root.is_dir() and not self.root.is_symlink() and os.listdir(self.root) and self.is_run():
                raise UsageError(f"{self.root}: a run already exists here; pass `resume` to continue it or choose another `out`")
            check_replaceable_dir(self.root, lambda path: os.listdir(path), "`out`")  # new, or an empty folder
        else:
            if not self.root.is_dir() or not self.is_run():
                raise UsageError(f"{self.root}: nothing to resume (no vpr training run here); drop `resume` to start a new run")
            if not self.last.is_file():
                raise UsageError(f"{self.root}: nothing to resume (no last.pt); start a new run with another `out`")
            saved = self.read_config()
            if saved.get("method") != config["method"]:
                raise UsageError(f"{self.config}: not the settings of a vpr {config['method']} run (method "
                                 f"{saved.get('method')!r}); resume with the run's own `method` or choose another `out`")
            changed = sorted(k for k in config if k in saved and saved[k] != config[k] and k not in FREE_TO_CHANGE)
            if changed:
                raise UsageError(f"{self.root}: `resume` with changed settings {changed}; use the original ones or a new `out`")

    def prepare(self, config: dict, resume: bool, inputs: list[Path]) -> None:
        """Check again (see `check`), then create the run directory and write its config.json."""
        self.check(config, resume, inputs)
        make_owned_dir(self.root, "run", "run folder", "choose a writable `out`")
        with atomic_file(self.config) as tmp:
            tmp.write_text(json.dumps(config, indent=2, default=str))

    def read_config(self) -> dict:
        """The run's saved settings; a missing or corrupt config.json is a one-line error."""
        try:
            saved = json.loads(self.config.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{self.config}: missing, so the run's settings are unknown; start a new run with another `out`") from None
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.config}: not valid JSON ({str(exc)[:80]}); the run cannot be resumed, start a new one with another `out`") from None
        if not isinstance(saved, dict):
            raise CheckpointError(f"{self.config}: not a vpr run configuration; start a new run with another `out`")
        return saved

    def append_log(self, record: dict) -> None:
        """One strict JSON line per epoch (a non-finite figure is written as null)."""
        with disk_full_errors(self.log), open(self.log, "a") as handle:
            handle.write(to_json(record, indent=None))

    def trim_log(self, epochs_done: int) -> None:
        """Keep only log lines of epochs already in last.pt (a kill may have left a later one, or half a line)."""
        if not self.log.is_file():
            return
        kept = []
        for line in self.log.read_text().splitlines():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # a line cut short by the kill
                continue
            epoch = record.get("epoch", 0) if isinstance(record, dict) else None
            if isinstance(epoch, int) and epoch <= epochs_done:  # anything else is not a line vpr wrote
                kept.append(line)
        with atomic_file(self.log) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))


def refuse_divergence(model: torch.nn.Module, record: dict, epoch: int, run: "RunDir", last_saved: int) -> None:
    """Stop a run whose epoch ended with a non-finite loss or weights, before any checkpoint is replaced:
    `last.pt` (and `best.pt`) keep the last healthy epoch."""
    loss = record.get("loss")
    finite_loss = isinstance(loss, (int, float)) and math.isfinite(loss)
    finite_weights = all(bool(torch.isfinite(p).all()) for p in model.state_dict().values() if p.is_floating_point())
    if finite_loss and finite_weights:
        return
    what = f"the loss is {loss}" if not finite_loss else "the weights hold NaN or infinite values"
    kept = f"{run.last} still holds epoch {last_saved}" if last_saved else "no checkpoint was written"
    raise TrainingError(f"epoch {epoch}: {what}, the training diverged; {kept}; start again in a new `out` "
                        "with a lower `lr` (or `classifier_lr`)")


def save_training_checkpoint(path: Path, model: VPRModel, training: dict, pca: PCA | None = None) -> None:
    """A vpr checkpoint plus the `training` state needed to resume exactly."""
    save_checkpoint(model, path, pca=pca, extra={"training": training})


def load_resumable(run: "RunDir", method: str) -> tuple[VPRModel, dict]:
    """The model and training state a resumed run continues from: `last.pt` must be a vpr training
    checkpoint of `method`, else a one-line error before the run folder is touched."""
    try:
        model, _, state = load_training_checkpoint(run.last)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc.args[0]}; {run.root} is not a vpr run that `resume` can continue: choose another `out`") from exc
    if state.get("method", method) != method or not isinstance(state.get("epoch"), int):
        raise CheckpointError(f"{run.last}: a {state.get('method')} run's checkpoint, not {method}'s; "
                              "resume with the run's own `method` or choose another `out`")
    return model, state


def load_training_checkpoint(path: Path) -> tuple[VPRModel, PCA | None, dict]:
    """(model, pca, training state) from `last.pt`."""
    payload = load_payload(path)
    extra = payload.get("extra")
    training = extra.get("training") if isinstance(extra, dict) else None
    if not isinstance(training, dict):
        raise CheckpointError(f"{path}: holds no training state; resume from a run's last.pt")
    model, pca = model_from_payload(payload, path)
    return model, pca, training

def saved_best(state: dict, run: RunDir) -> dict | None:
    """The best epoch and recalls kept in `state`; runs of earlier versions kept them differently."""
    best = state.get("best")
    if isinstance(best, dict) and "recalls" in best:
        return best
    if isinstance(best, dict) and best.get("recall"):  # NetVLAD runs before the shared loop
        return {"epoch": int(best["epoch"]), "recalls": dict(best["recall"])}
    if run.best.is_file():  # CosPlace runs before the shared loop kept only best_r1: read best.pt
        extra = load_payload(run.best).get("extra") or {}
        return {"epoch": int(extra.get("epoch", 0)), "recalls": dict(extra.get("recalls") or extra.get("recall") or {})}
    return None
