"""Where a job runs: the device ('auto' is CUDA when a GPU is visible; under torchrun each process's own GPU),
extraction settings on it, and torchrun's process group around a job. Imports torch only when called."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from vpr.errors import UsageError
from vpr.retrieval.options import ExtractOptions


def resolve_device(device: object = "auto") -> str:
    """'auto' -> CUDA when a GPU is visible, else the CPU; a named GPU must exist. Under torchrun, 'auto' and
    'cuda' name the GPU of this process's local rank."""
    import torch

    from vpr import distributed

    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"`device={name}`: no CUDA GPU is visible; use `device=cpu`")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise UsageError(f"`device={name}`: use auto, cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise UsageError(f"`device={name}`: use auto, cpu, cuda or cuda:N")
    if str(resolved) == "cuda" and distributed.launched():
        return f"cuda:{distributed.local_rank()}"
    return str(resolved)


def extract_options(device: object = "auto", **settings) -> ExtractOptions:
    """`ExtractOptions` on a resolved `device` (`resolve_device`); decoding on the device needs CUDA."""
    resolved = resolve_device(device)
    if settings.get("decode_on_device") and not resolved.startswith("cuda"):
        raise UsageError(f"`decode_on_device` needs a CUDA device (got `device={device}`)")
    return ExtractOptions(device=resolved, **settings)


def bf16_is_slow(device: str) -> bool:
    """Whether bf16 autocast would be emulated here (a CPU without native bf16): slower than fp32, not faster."""
    import torch

    return device == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported()


@contextmanager
def distributed_run(device: str) -> Iterator[bool]:
    """Join torchrun's process group for a job's body (a no-op without torchrun) and leave it at the end;
    yields whether this process is the one that writes and reports (rank 0)."""
    from vpr import distributed

    distributed.init(device)
    try:
        yield distributed.is_main()
    finally:
        distributed.shutdown()
