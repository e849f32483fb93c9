"""The machine, library versions and thread settings a benchmark ran with."""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path

import numpy as np
import torch

from vpr import __version__
from vpr.retrieval.search import faiss_available, faiss_gpu_count


def cpu_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 / AMX): autocast is fast there, slower elsewhere."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def machine_info(device: str) -> dict:
    """The machine, library versions and thread settings the figures were measured with."""
    cpu = platform.processor()
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = match.group(1) if match else cpu
    except OSError:
        pass
    info = {
        "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1) if hasattr(os, "sysconf") else None,
        "torch_threads": torch.get_num_threads(), "cpu_bf16": cpu_bf16(),
        "device": device, "gpu": None, "faiss_gpus": faiss_gpu_count(),
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 1e9, 1),
                       "capability": f"{props.major}.{props.minor}", "cudnn": torch.backends.cudnn.version()}
    return info


def versions() -> dict:
    """Versions of vpr and the libraries whose speed is measured."""
    import h5py
    import sklearn
    import torchvision
    import PIL

    out = {"vpr": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
           "torchvision": torchvision.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
           "h5py": h5py.__version__, "scikit-learn": sklearn.__version__, "faiss": None}
    if faiss_available():
        import faiss

        out["faiss"] = faiss.__version__
    return out
