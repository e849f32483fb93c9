"""`vpr models`: the architectures, descriptor sizes and checkpoint formats vpr supports."""

from __future__ import annotations

import typer
from rich.table import Table

from cli.common import console, print_json
from vpr.models.published import supported_models


def _table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    return table


def models_cmd(
    json_out: bool = typer.Option(False, "--json", help="Print everything (including each format's identifying keys) as JSON."),
) -> None:
    """List the backbones, heads and descriptor sizes, and the checkpoint formats `build-index --checkpoint` reads."""
    info = supported_models()
    if json_out:
        print_json(info)
        return
    backbones = [
        (b["name"], f"{b['channels']['layer4']} / {b['channels']['layer3'] or '-'}", b["description"])
        for b in info["backbones"]
    ]
    heads = [(h["name"], h["descriptor_dim"], h["description"]) for h in info["heads"]]
    formats = [(f["name"], ", ".join(f["aliases"]) or "-", f["source"]) for f in info["formats"]]
    published = [
        (f["name"], p["model"], p["backbones"], p["descriptor_dims"]) for f in info["formats"] for p in f["published"]
    ]
    console.print(_table("backbones (--model)", ("name", "channels layer4 / layer3", "trunk"), backbones))
    console.print(_table("heads (--head)", ("name", "descriptor size", "computation"), heads))
    console.print(_table("checkpoint formats (--checkpoint FILE; detected from its keys, or --format NAME)",
                         ("format", "aliases", "from"), formats))
    console.print(_table("published models they hold", ("format", "model", "backbones", "descriptor sizes"), published))
    height, width = info["published_input_size"]
    console.print(
        f"Published checkpoints are fed {height}x{width} images with {info['published_normalisation']} "
        "(--resize changes the size); `vpr models --json` lists each format's identifying keys."
    )
