"""What `vpr models` lists: every backbone, head, published file and checkpoint format the registry holds, and
the hint that names the published file a broken download was meant to be."""

from __future__ import annotations

from pathlib import Path

from vpr.errors import UsageError
from vpr.models import registry
from vpr.models.backbones import backbone_channels
from vpr.models.formats import DEFAULT_INPUT_SIZE


def published_file_hint(path: Path) -> str:
    """'; it is named like MegaLoc's model.safetensors (URL): download it again', naming every published
    file of that name; '' when none has it."""
    matches = [(entry.method, entry.file, entry.url) for layout in registry.layouts().values() for entry in layout.published
               if Path(path).match(entry.file.replace("{DIM}", "*"))]
    if not matches:
        return ""
    named = " or ".join(dict.fromkeys(f"{method}'s {file} ({url})" for method, file, url in matches))
    return f"; it is named like {named}: download it again"


def supported_models() -> dict:
    """What `vpr models` prints: backbones, heads, published methods and the checkpoint formats vpr reads."""
    return {
        "backbones": [
            {"name": name, "channels": {"layer4": _channels(name, 4), "layer3": _channels(name, 3)},
             "description": record.description}
            for name, record in registry.backbones().items()
        ],
        "heads": [{"name": head.name, "descriptor_dim": head.dims, "description": head.description}
                  for head in registry.heads().values()],
        "methods": [
            {"method": entry.method, "backbone": entry.backbone, "descriptor_dims": entry.dims, "input": entry.input,
             "file": entry.file, "url": entry.url, "format": layout.name}
            for layout in registry.layouts().values() for entry in layout.published
        ],
        "formats": [
            {"name": layout.name, "aliases": list(layout.aliases), "source": layout.source, "keys": layout.keys}
            for layout in registry.layouts().values()
        ],
        "published_input_size": list(DEFAULT_INPUT_SIZE),
        "published_normalisation": "ImageNet mean/std",
    }


def _channels(name: str, layer: int) -> int | None:
    """Feature-map channels, or None where the cut does not exist (VGG16 at layer 3, ViTs at layer 3)."""
    try:
        return backbone_channels(name, layer)
    except UsageError:
        return None
