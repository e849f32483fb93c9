"""The inference side of a model: the one rule for mixed precision, shared by extraction and training."""

from __future__ import annotations

import torch


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype for `device`: bf16, or fp16 on GPUs without bf16 (which then needs a grad scaler to train)."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16
