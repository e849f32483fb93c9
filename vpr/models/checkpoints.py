"""Save and load checkpoints: ours (weights-only state dict + model config + optional PCA), and
the published layouts (CosPlace, NetVLAD, ..., and the method modules') through `vpr.models.formats`.

Files load with `torch.load(weights_only=True)`, so a checkpoint can never run arbitrary code; the
only globals added to torch's allowlist are numpy's numeric arrays and scalars, which published
training checkpoints use for their recall fields.
"""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from vpr import __version__
from vpr.errors import CheckpointError
from vpr.fileio import atomic_file
from vpr.models import registry
from vpr.models.model import ModelConfig, VPRModel, build_model
from vpr.models.pca import PCA
from vpr.models.catalog import published_file_hint
from vpr.models.formats import import_published, resolve_format

FORMAT = "vpr-checkpoint"
FORMAT_VERSION = 1


def _numpy_globals() -> list:
    """numpy's numeric ndarray/scalar reconstructors, under their numpy 1 and numpy 2 module names."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    numeric = ("Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
               "Float16", "Float32", "Float64")
    allowed: list = [np.ndarray, np.dtype, *(getattr(np.dtypes, f"{name}DType") for name in numeric)]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar")]
    return allowed


def save_checkpoint(model: VPRModel, path: Path, *, pca: PCA | None = None, extra: dict | None = None) -> Path:
    """Write `model` (and the PCA that goes with it) atomically to `path`."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vpr_version": __version__,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if pca is not None:
        payload["pca"] = pca.to_state()
    if getattr(model, "random_init", False):
        payload["random_init"] = True
    if extra:
        payload["extra"] = extra
    with atomic_file(Path(path)) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_payload(path: Path) -> dict:
    """Read a checkpoint file safely (weights only: `.pth`/`.ckpt` through torch, `.safetensors`
    through the safetensors package), with one-line errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; check the path")
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            reason = " ".join(str(exc).split())[:120] or type(exc).__name__
            raise CheckpointError(f"{path}: a damaged or truncated .safetensors file ({reason}){published_file_hint(path)}") from exc
    try:
        with torch.serialization.safe_globals([*_numpy_globals(), *registry.pickle_globals()]):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, refused globals
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        if "Unsupported global" in str(exc):  # e.g. a Lightning .ckpt whose hyper-parameters pickle a class
            reason = next(line.strip() for line in str(exc).splitlines() if "Unsupported global" in line)[:160]
            raise CheckpointError(
                f"{path}: not a weights-only checkpoint: it pickles objects besides its weights ({reason}), which vpr never loads. If you trust "
                f"the file, keep only its weights with this command, then give the file it writes: {weights_only_command(path)}"
            ) from exc
        hint = published_file_hint(path)
        raise CheckpointError(
            f"{path}: not a loadable weights-only checkpoint ({reason}); "
            + (hint.lstrip("; ") if hint else "vpr refuses files that need arbitrary pickles")
        ) from exc
    if not isinstance(payload, dict):
        if path.name.endswith("_c_centers.pt"):
            raise CheckpointError(f"{path}: an AnyLoc VLAD vocabulary alone; join it with its DINOv2 weights first: "
                                  f"vpr join-anyloc dinov2_vitg14_pretrain.pth {path.name} anyloc.pth")
        raise CheckpointError(f"{path}: checkpoint holds a {type(payload).__name__}, expected a dict of tensors")
    return payload


def weights_only_command(path: Path) -> str:
    """A shell command that saves the weights of a trusted pickled checkpoint as `NAME.pth`: the file names
    are quoted arguments, never part of the code, so pasting it runs nothing a file name could hide."""
    code = "import sys, torch; c = torch.load(sys.argv[1], weights_only=False); torch.save(c.get('state_dict', c), sys.argv[2])"
    return shlex.join(["python", "-c", code, str(path), str(Path(path).with_suffix(".pth"))])


def _is_safetensors(path: Path) -> bool:
    """A `.safetensors` name, or the format's header (8-byte little-endian length, then '{')."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def is_vpr_checkpoint(path: Path) -> bool:
    """Whether `path` is a checkpoint vpr wrote (`save_checkpoint`): read weights-only, its format field."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch file, or one that needs pickled code
        return False
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def load_checkpoint(path: Path, fmt: str | None = None) -> tuple[VPRModel, PCA | None]:
    """Rebuild a model (and its PCA, if stored) from our checkpoint or a published one.

    `fmt` None (or "auto") detects the layout; otherwise it forces one of `vpr models`' formats.
    """
    layout = None if fmt is None else resolve_format(fmt)
    payload = load_payload(path)
    if payload.get("format") == FORMAT and layout in (None, "vpr"):
        return model_from_payload(payload, path)
    model, pca = import_published(payload, Path(path), layout)
    refuse_non_finite(model, pca, path)
    return model, pca


def load_vpr_checkpoint(handle: BinaryIO, where: Path) -> tuple[VPRModel, PCA | None]:
    """A vpr checkpoint read from an open file (an index's model.pt, opened inside its generation)."""
    try:
        payload = torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip or refused-global errors
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{where}: not a loadable weights-only checkpoint ({reason})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a vpr checkpoint")
    return model_from_payload(payload, where)


def refuse_non_finite(model: VPRModel, pca: PCA | None, path: Path) -> None:
    """Raise `CheckpointError` when a weight or PCA value is NaN or infinite (a diverged or damaged file)."""
    tensors = [(name, t) for name, t in model.state_dict().items() if t.is_floating_point()]
    if pca is not None:
        tensors += [(f"pca.{name}", torch.as_tensor(v)) for name, v in (("mean", pca.mean), ("components", pca.components), ("scale", pca.scale))]
    for name, tensor in tensors:  # in slices: isfinite's temporaries of a whole 140M-weight layer would be a gigabyte
        if not all(bool(torch.isfinite(part).all()) for part in tensor.detach().reshape(-1).split(1 << 22)):
            raise CheckpointError(f"{path}: weight '{name}' holds NaN or infinite values (a diverged or damaged model); use another checkpoint")


def model_from_payload(payload: dict, path: Path) -> tuple[VPRModel, PCA | None]:
    """Build the model and PCA described by a vpr checkpoint payload. The model takes the payload's
    tensors themselves (built on the meta device, then assigned): no second copy of the weights."""
    try:
        config = ModelConfig.from_dict(payload["config"])
        with torch.device("meta"):
            model = VPRModel(config)
        model.load_state_dict(payload["state_dict"], assign=True)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a non-persistent buffer: build it for real
            model = build_model(config, seed=None)
            model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: checkpoint config and weights do not match ({str(exc)[:160]})") from exc
    pca = PCA.from_state(payload["pca"]) if payload.get("pca") is not None else None
    refuse_non_finite(model, pca, path)
    model.random_init = payload.get("random_init") is True
    return model.eval(), pca


def model_fingerprint(model: VPRModel) -> str:
    """SHA-256 of a model's config and weights: ties caches and indexes to the exact model."""
    digest = hashlib.sha256(repr(sorted(model.config.to_dict().items())).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
