"""Pieces shared by the CosPlace and NetVLAD trainers: run directory, exact resume, validation, logs.

A run directory `runs/NAME/` holds `config.json`, `last.pt`, `best.pt` and `log.jsonl`. `last.pt` and
`best.pt` are ordinary vpr checkpoints (usable with `vpr build-index --checkpoint`) plus a
`training` entry with everything `--resume` needs: epoch, optimiser states, extra modules and RNG
states. All writes are atomic.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vpr.data.datasets import GeoImageSet, positives_within
from vpr.errors import CheckpointError, OutputError, UsageError
from vpr.evaluation.recall import recall_at_n
from vpr.fileio import MARKER, atomic_file, check_replaceable_dir, check_separate, marker_kind, output_lock, write_marker
from vpr.models.checkpoints import load_payload, model_from_payload, save_checkpoint
from vpr.models.model import VPRModel
from vpr.models.pca import PCA
from vpr.retrieval.extract import Progress, extract_descriptors
from vpr.retrieval.index import torch_search


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
                raise UsageError(f"{self.root}: a run already exists here; pass --resume to continue it or choose another --out")
            check_replaceable_dir(self.root, lambda path: os.listdir(path), "--out")  # new, or an empty folder
        else:
            if not self.root.is_dir() or not self.is_run():
                raise UsageError(f"{self.root}: nothing to resume (no vpr training run here); drop --resume to start a new run")
            if not self.last.is_file():
                raise UsageError(f"{self.root}: nothing to resume (no last.pt); start a new run with another --out")
            saved = self.read_config()
            changed = sorted(k for k in config if k in saved and saved[k] != config[k] and k not in FREE_TO_CHANGE)
            if changed:
                raise UsageError(f"{self.root}: --resume with changed settings {changed}; use the original ones or a new --out")

    def prepare(self, config: dict, resume: bool, inputs: list[Path]) -> None:
        """Check again (see `check`), then create the run directory and write its config.json."""
        self.check(config, resume, inputs)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if marker_kind(self.root) != "run":
                write_marker(self.root, "run")
        except OSError as exc:
            raise OutputError(f"{self.root}: cannot create the run folder ({exc.strerror}); choose a writable --out") from exc
        with atomic_file(self.config) as tmp:
            tmp.write_text(json.dumps(config, indent=2, default=str))

    def read_config(self) -> dict:
        """The run's saved settings; a missing or corrupt config.json is a one-line error."""
        try:
            saved = json.loads(self.config.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{self.config}: missing, so the run's settings are unknown; start a new run with another --out") from None
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.config}: not valid JSON ({str(exc)[:80]}); the run cannot be resumed, start a new one with another --out") from None
        if not isinstance(saved, dict):
            raise CheckpointError(f"{self.config}: not a vpr run configuration; start a new run with another --out")
        return saved

    def append_log(self, record: dict) -> None:
        """One JSON line per epoch."""
        with open(self.log, "a") as handle:
            handle.write(json.dumps(record, default=float) + "\n")


def save_training_checkpoint(path: Path, model: VPRModel, training: dict, pca: PCA | None = None) -> None:
    """A vpr checkpoint plus the `training` state needed to resume exactly."""
    save_checkpoint(model, path, pca=pca, extra={"training": training})


def load_training_checkpoint(path: Path) -> tuple[VPRModel, PCA | None, dict]:
    """(model, pca, training state) from `last.pt`."""
    payload = load_payload(path)
    training = (payload.get("extra") or {}).get("training")
    if training is None:
        raise CheckpointError(f"{path}: holds no training state; resume from a run's last.pt")
    model, pca = model_from_payload(payload, path)
    return model, pca, training


def validate(
    model: VPRModel, database: GeoImageSet, queries: GeoImageSet, *, ns: tuple[int, ...] = (1, 5),
    threshold: float = 25.0, batch_size: int = 32, num_workers: int = 0, device: str = "cpu",
    amp: bool = False, progress: Progress | None = None,
) -> dict[int, float]:
    """Recall@N (percent) of `model` on a labelled split, exact search, standard 25 m protocol."""
    was_training = model.training
    db = extract_descriptors(model, database.paths, batch_size=batch_size, num_workers=num_workers, device=device, amp=amp, progress=progress).descriptors
    q = extract_descriptors(model, queries.paths, batch_size=batch_size, num_workers=num_workers, device=device, amp=amp).descriptors
    model.train(was_training)
    positives = positives_within(database.require_labels("validation"), queries.require_labels("validation"), threshold)
    _, predictions = torch_search(db, q, max(ns), device=device)
    return recall_at_n(predictions, positives, ns)
