"""The library names its parameters in messages, marked with backticks (`pca_dim=0`, `cache=False`); a command
says them as the flags its user typed (--pca-dim 0, --no-cache), read from the command's own option declarations."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

MARKED = re.compile(r"`([a-z_][a-z0-9_]*)(?:=([^`]*))?`")  # as vpr.errors.PARAMETER marks them
Flags = dict[str, tuple[str, str | None]]
ALIASES = {"compile": "compile_model", "decode_on_device": "gpu_decode", "num_workers": "workers"}  # library -> command


def flag_table(command: Callable) -> Flags:
    """Parameter name -> (its flag, its negative flag or None) for a Typer command; arguments by their metavar."""
    table: Flags = {}
    for name, parameter in inspect.signature(command).parameters.items():
        declared = getattr(parameter.default, "param_decls", None)
        if declared:
            on, _, off = declared[0].partition("/")
            table[name] = (on, off or None)
        elif type(parameter.default).__name__ == "ArgumentInfo":
            table[name] = (name.upper(), None)
    table.update({library: table[command] for library, command in ALIASES.items() if command in table})
    return table


ALTERNATIVE = re.compile(r"[,;] or [^,;`]*`([a-z_][a-z0-9_]*)(?:=[^`]*)?`[^,;]*")  # ", or build with `skip_bad`"


def as_flags(message: str, table: Flags) -> str:
    """`message` with every marked parameter the command has said as its flag (`k=0` -> -k 0, `cache=False` ->
    --no-cache); an alternative naming a parameter that is not the command's own (", or build with `skip_bad`"
    in `vpr query`) is left out, and the rest say another command's flag (`table`'s fallback) or stay as written."""
    message = ALTERNATIVE.sub(lambda match: match.group(0) if dict.__contains__(table, match.group(1)) else "", message)

    def say(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        if name not in table:
            return match.group(0)
        on, off = table[name]
        if value is None:
            return on
        value = value.strip("'\"")
        if value == "True":
            return on
        if value == "False":
            return off or f"no {on}"
        return f"{on} {value}"

    return MARKED.sub(say, message)
