"""`vpr models` (the architectures, descriptor sizes and checkpoint formats vpr supports) and `vpr join-anyloc`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.common import console, print_json
from vpr import api


def _table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]], whole: tuple[str, ...] = ()) -> Table:
    """A titled table; the `whole` columns wrap onto more lines rather than being cut (URLs, file names)."""
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold" if column in whole else "ellipsis", no_wrap=False)
    for row in rows:
        table.add_row(*row)
    return table


def models_cmd(
    wide: bool = typer.Option(False, "--wide", help="Every table in full: backbones, heads, checkpoint formats, and each published file with where to get it."),
    json_out: bool = typer.Option(False, "--json", help="Print everything (including each format's identifying keys) as JSON."),
) -> None:
    """List the published methods vpr loads (short); with --wide also the backbones, heads, checkpoint formats and
    where each file comes from."""
    info = api.supported_models()
    if json_out:
        print_json(info)
        return
    if not wide:
        published = [(m["method"], m["backbone"], m["descriptor_dims"], m["format"]) for m in info["methods"]]
        console.print(_table("published models (vpr build-index DIR --checkpoint FILE)",
                             ("method", "backbone", "descriptor size", "format"), published, whole=("method", "format")))
        for what, flag, items in (("backbones", "--model", info["backbones"]), ("heads", "--head", info["heads"])):
            console.print(f"{what} ({flag}): {', '.join(item['name'] for item in items)}", soft_wrap=False)
        console.print("`vpr models --wide` shows every table with each file's name and download URL; --json all of it.",
                      soft_wrap=False)
        return
    backbones = [
        (b["name"], f"{b['channels']['layer4']} / {b['channels']['layer3'] or '-'}", b["description"])
        for b in info["backbones"]
    ]
    heads = [(h["name"], h["descriptor_dim"], h["description"]) for h in info["heads"]]
    formats = [(f["name"], ", ".join(f["aliases"]) or "-", f["source"]) for f in info["formats"]]
    published = [(m["method"], m["backbone"], m["descriptor_dims"], m["input"], m["file"], m["format"]) for m in info["methods"]]
    console.print(_table("backbones (--model)", ("name", "channels layer4 / layer3", "trunk"), backbones))
    console.print(_table("heads (--head)", ("name", "descriptor size", "computation"), heads))
    console.print(_table("checkpoint formats (--checkpoint FILE; detected from its keys, or --format NAME)",
                         ("format", "aliases", "from"), formats, whole=("from",)))
    console.print(_table("published models (vpr build-index DIR --checkpoint FILE)",
                         ("method", "backbone", "descriptor size", "input", "file", "format"), published,
                         whole=("method", "file", "format")))
    console.print("where to get each file:")
    for m in info["methods"]:  # one line each, never cut, so the URL can be copied
        console.print(f"  {m['method']}: {m['file']}  {m['url']}", soft_wrap=True, highlight=False)
    height, width = info["published_input_size"]
    console.print(
        f"Each method's preprocessing (input size, resize rule, interpolation, {info['published_normalisation']}) "
        f"is stored in the index; CNN checkpoints without one are fed {height}x{width}. --resize overrides it. "
        "`vpr models --json` lists each format's identifying keys."
    )


def join_anyloc_cmd(
    dinov2: Path = typer.Argument(..., help="DINOv2 weights, e.g. dinov2_vitg14_pretrain.pth."),
    centers: Path = typer.Argument(..., help="AnyLoc vocabulary, e.g. dinov2_vitg14_l31_value_c32_urban_c_centers.pt."),
    out: Path = typer.Argument(..., help="The joined file to write, e.g. anyloc_urban.pth (a new file, or one this command wrote)."),
    layer: Optional[int] = typer.Option(None, "--layer", min=0, max=63, help="DINOv2 block (default: from the vocabulary's name, else 31)."),
    facet: Optional[str] = typer.Option(None, "--facet", help="query, key, value or token (default: from the name, else value)."),
) -> None:
    """Join DINOv2 weights and an AnyLoc vocabulary into one file for `vpr build-index --checkpoint`."""
    info = api.join_anyloc(dinov2, centers, out, layer, facet)
    console.print(f"wrote {info['out']}: {info['backbone']} block {info['layer']} {info['facet']} + {info['num_clusters']} "
                  f"centres; use: vpr build-index IMAGES --checkpoint {info['out']} --out INDEX")
