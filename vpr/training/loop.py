"""The one training loop every method runs in: resume, validation after each epoch, checkpoints, the log.

A run directory `runs/NAME/` (`vpr.training.run`) holds `config.json`, `last.pt`, `best.pt` and `log.jsonl`.
`last.pt` and `best.pt` are ordinary vpr checkpoints (usable with `vpr build-index --checkpoint`); `last.pt`
adds a `training` entry with everything `resume` needs: epoch, best so far, RNG states, grad scaler and the
method's own state (optimisers, extra modules). All writes are atomic.

A method (CosPlace, NetVLAD) plugs in as a `Method`: how it reads its data, builds its model and
optimisers, trains one epoch and what it keeps in `last.pt`. The loop does the rest: the run folder
and its safety rules, resume, validation after each epoch, `best.pt` by the best-model rule
(`is_better`: highest R@1, ties broken by R@5), `last.pt`, the log and the result.

Under torchrun (`vpr.distributed`) every rank runs `train`: the method trains through `parallel(model)`
(DistributedDataParallel) on its share of each step's batch; validation shares the images too, and
rank 0 alone holds the run's lock, searches and writes the run folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from vpr import distributed
from vpr.data.datasets import GeoImageSet, find_split, load_folder, load_split
from vpr.data.ground_truth import positives_within
from vpr.errors import ImageError, UsageError
from vpr.evaluation.recall import recall_at_n
from vpr.models.checkpoints import save_checkpoint
from vpr.models.inference import amp_dtype
from vpr.models.model import VPRModel
from vpr.models.pca import PCA
from vpr.retrieval.extract import Progress
from vpr.retrieval.sharded import extract_sharded
from vpr.retrieval.options import ExtractOptions
from vpr.retrieval.search import torch_search
from vpr.training.config import TrainConfig
from vpr.training.run import (
    RunDir, load_resumable, refuse_divergence, rng_state, saved_best, save_training_checkpoint, seed_everything,
    set_rng_state,
)

TrainProgress = Callable[[str, int, int], None]  # (phase, done, total)
Phase = Callable[[str], "Progress | None"]  # a phase name -> its (done, total) callback, or None without progress
RECALLS = (1, 5)


def validate(
    model: VPRModel, database: GeoImageSet, queries: GeoImageSet, options: ExtractOptions, *,
    ns: tuple[int, ...] = RECALLS, threshold: float = 25.0, progress: Progress | None = None, pca: PCA | None = None,
) -> dict[int, float]:
    """Recall@N (percent) of `model` (and its `pca`) on a labelled split, exact search, standard 25 m protocol.

    Under torchrun every rank calls it: the ranks share the images (with rank 0's BatchNorm statistics),
    rank 0 searches, and every rank returns its figures."""
    distributed.broadcast_buffers(model)
    db = extract_sharded(model, database.paths, options, progress=progress).descriptors
    q = extract_sharded(model, queries.paths, options).descriptors
    found = None
    if distributed.is_main():
        if pca is not None:
            db, q = pca.transform(db), pca.transform(q)
        positives = positives_within(database.require_labels("validation"), queries.require_labels("validation"), threshold)
        _, predictions = torch_search(db, q, max(ns), device=str(options.device))
        found = recall_at_n(predictions, positives, ns)
    return distributed.broadcast_object(found)


def validation_sets(cfg: TrainConfig) -> tuple[GeoImageSet, GeoImageSet]:
    """The labelled (database, queries) validated on: the config's `val` folder (database/ and queries/, or a
    dataset root's `val_split`) when it has one, else the dataset's `val_split`."""
    val = getattr(cfg, "val", None)
    root = Path(val or cfg.dataset)
    if (root / "database").is_dir() and (root / "queries").is_dir():
        return load_folder(root / "database"), load_folder(root / "queries")
    if val is not None and find_split(root, cfg.val_split) is None:
        raise UsageError(f"`val` {root}: needs database/ and queries/ with positions (or a dataset root with a "
                         f"{cfg.val_split} split)")
    if val is None and (root.is_file() or (root / "Dataframes").is_dir()):
        raise UsageError(f"`dataset` {root}: has no {cfg.val_split} split to validate on; give `val` (a folder of "
                         "database/ and queries/ with positions)")
    return load_split(root, cfg.val_split)


def is_better(recalls: dict[str, float], best: dict | None) -> bool:
    """The best-model rule of every method: higher R@1, ties broken by higher R@5."""
    if best is None:
        return True
    saved = best["recalls"]
    return (recalls["R@1"], recalls["R@5"]) > (saved.get("R@1", -1.0), saved.get("R@5", -1.0))


def to_cpu(value):
    """Tensors anywhere inside dicts/lists moved to the CPU (so checkpoints load without a GPU)."""
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


def first_error(errors: list[str]) -> None:
    """Raise the first image error of a batch (its text names the file)."""
    bad = next((e for e in errors if e), None)
    if bad:
        raise ImageError(bad)


def freeze_early_layers(model: VPRModel) -> None:
    """Freeze the layers the reference code freezes: ResNet conv1..layer2, VGG16 conv1..conv4."""
    frozen = 24 if model.config.backbone == "vgg16" else 6
    for module in list(model.backbone.children())[:frozen]:
        for param in module.parameters():
            param.requires_grad_(False)


def trainable(model: VPRModel, cfg: TrainConfig) -> list[torch.nn.Parameter]:
    """Freeze the early layers if asked, move the model to the device for training; its trainable weights."""
    if cfg.freeze_early:
        freeze_early_layers(model)
    model.to(torch.device(cfg.device)).to(memory_format=torch.channels_last).train()
    return [p for p in model.parameters() if p.requires_grad]


class Precision:
    """Mixed precision for training: autocast with `amp_dtype` on CUDA, a grad scaler only for fp16."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.dtype = amp_dtype(torch.device(cfg.device)) if cfg.use_amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)

    def autocast(self) -> AbstractContextManager:
        return torch.autocast("cuda", dtype=self.dtype) if self.dtype is not None else nullcontext()

    def step(self, loss: torch.Tensor, optimizers: list[torch.optim.Optimizer],
             shared: Sequence[torch.nn.Parameter] = ()) -> None:
        """Zero the gradients, back-propagate `loss` (scaled when fp16) and step every optimiser.

        `shared`: parameters outside DistributedDataParallel whose gradients are averaged over the ranks first."""
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        for param in shared:
            if param.grad is not None:
                distributed.all_reduce_mean(param.grad)
        for optimizer in optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()


def parallel(model: VPRModel, cfg: TrainConfig) -> torch.nn.Module:
    """`model` in DistributedDataParallel when several ranks train (rank 0's weights then on all), else itself."""
    if distributed.world_size() == 1:
        return model
    device = torch.device(cfg.device)
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def rank0_first(work: Callable[[], object], others: bool = True) -> object:
    """`work()` on rank 0, then (`others`) on the other ranks, which find what rank 0 cached (groups, clusters).

    An error of rank 0's is raised on every rank, so none waits for a rank that gave up."""
    done, error = None, None
    if distributed.is_main():
        try:
            done = work()
        except Exception as exc:  # sent to the other ranks, then raised here too
            error = exc
    sent = distributed.broadcast_object(error)
    if sent is not None:
        raise error or sent
    return work() if others and not distributed.is_main() else done


def global_share(count: int) -> slice:
    """This rank's rows of a global batch of `count` items (contiguous, rank order); every rank needs one."""
    if count < distributed.world_size():
        raise UsageError(f"a batch of {count} cannot be shared by {distributed.world_size()} ranks; raise `batch_size`")
    part = distributed.shard(count)
    return slice(int(part[0]), int(part[-1]) + 1)


class Method:
    """What a training method plugs into `train`; subclasses fill in the five hooks."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.precision = Precision(cfg)
        self.model: VPRModel
        self.epochs = cfg.epochs  # how many the run trains; `load` may decide it from the data (a budget of steps)

    def load(self) -> None:
        """Read and check the training data; runs before the run folder is written, so errors leave nothing."""

    def start(self, run: RunDir, model: VPRModel | None, state: dict | None, phase: Phase) -> None:
        """Build the model (`model` None: a new run, RNGs seeded) or take the resumed one and `state`; then the optimisers."""
        raise NotImplementedError

    def train_epoch(self, epoch: int, phase: Phase) -> dict:
        """Train one epoch; a record with at least `loss`, `images` and `train_seconds`."""
        raise NotImplementedError

    def state(self) -> dict:
        """The method's part of last.pt's `training` entry (weights-only loadable)."""
        raise NotImplementedError

    def finish(self, run: RunDir, epochs_done: int, phase: Phase) -> dict:
        """Work after the last epoch (e.g. NetVLAD's whitening); method-specific figures for the result."""
        return {}


@dataclass
class TrainResult:
    """Where a run left its checkpoints, its best epoch and recalls, and the records of the epochs trained now."""

    run_dir: Path
    last: Path
    best: Path
    best_epoch: int = 0
    best_recall: dict[str, float] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    extras: dict = field(default_factory=dict)


def phases(progress: TrainProgress | None, prefix: str = "") -> Phase:
    """Phase callbacks named `prefix + name` for the trainer's (phase, done, total) progress."""
    def phase(name: str) -> Progress | None:
        return None if progress is None else (lambda done, total: progress(prefix + name, done, total))
    return phase


def train(
    config: TrainConfig, method_type: type[Method], *, resume: bool = False, progress: TrainProgress | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train (or `resume`) `method_type` in `config.out`, validating on `config.val_split` after each epoch."""
    start_time = time.perf_counter()
    cfg = config.resolved()
    run, inputs = RunDir(Path(cfg.out)), [Path(cfg.dataset)]
    main = distributed.is_main()
    with distributed.main_first(run.locked):  # one job per run folder; under torchrun rank 0 holds the lock
        rank0_first(lambda: run.check(cfg.to_dict(), resume, inputs), others=False)  # rank 0 holds the lock file
        val_db, val_q = validation_sets(cfg)
        for images in (val_db, val_q):
            images.require_labels("validation")
        method = method_type(cfg)
        method.load()
        resumed = load_resumable(run, cfg.method) if resume else None  # checked before anything is written
        rank0_first(lambda: run.prepare(cfg.to_dict(), resume, inputs), others=False)
        first, best = 0, None
        if resumed is not None:
            model, state = resumed
            method.start(run, model, state, phases(progress))
            if state.get("scaler"):
                method.precision.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            first, best = int(state["epoch"]), saved_best(state, run)
            if main:
                run.trim_log(first)
        else:
            seed_everything(cfg.seed)
            method.start(run, None, None, phases(progress))
        method.model.random_init = False  # trained from here on: its checkpoints are not marked as random weights
        records: list[dict] = []
        for epoch in range(first, method.epochs):
            tic = time.perf_counter()
            phase = phases(progress, f"epoch {epoch + 1}/{method.epochs} ")
            record = {"epoch": epoch + 1, **method.train_epoch(epoch, phase)}
            refuse_divergence(method.model, record, epoch + 1, run, epoch)
            found = validate(method.model, val_db, val_q, cfg.extract_options(), progress=phase("validating"))
            recalls = {f"R@{n}": value for n, value in found.items()}
            improved = is_better(recalls, best)
            if improved:
                best = {"epoch": epoch + 1, "recalls": recalls}
            if main:
                if improved:
                    save_checkpoint(method.model, run.best, extra={"epoch": epoch + 1, "recalls": recalls})
                training = {"method": cfg.method, "epoch": epoch + 1, "best": best, "rng": rng_state(),
                            "scaler": method.precision.scaler.state_dict(), **method.state()}
                save_training_checkpoint(run.last, method.model, to_cpu(training))
            record.update(recalls, best=improved, seconds=round(time.perf_counter() - tic, 2),
                          images_per_second=round(record["images"] / max(record["train_seconds"], 1e-9), 2))
            if main:
                run.append_log(record)
            records.append(record)
            if on_epoch:
                on_epoch(record)
        extras = method.finish(run, max(first, method.epochs), phases(progress))
        distributed.barrier()
        best = best or {"epoch": 0, "recalls": {}}
        return TrainResult(run.root, run.last, run.best, best["epoch"], best["recalls"], records,
                           time.perf_counter() - start_time, extras)
