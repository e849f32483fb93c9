"""Errors a user can cause: one-line messages that name the file and the fix.

The CLI maps `exit_code` to the process exit status (1 runtime failure, 2 usage error).
"""

from __future__ import annotations


import re

PARAMETER = re.compile(r"`([a-z_][a-z0-9_]*(?:=[^`]*)?)`")  # a parameter the message names, marked for the CLI


def plain(message: str) -> str:
    """`message` as a Python caller reads it: the parameters it names without their marks."""
    return PARAMETER.sub(r"\1", message)


class VPRError(Exception):
    """Base of every error caused by user input; its message is shown without a traceback.

    Messages name the library's parameters in backticks (`pca_dim` 0, `cache=False`): a Python caller reads
    them plain (pca_dim 0, cache=False), and the command line says them as the flags its user typed
    (--pca-dim 0, --no-cache; `cli.flags`), from the marked text in `args[0]`."""

    exit_code = 1

    def __str__(self) -> str:
        return plain(super().__str__())


class UsageError(VPRError):
    """A wrong flag or argument combination (exit code 2)."""

    exit_code = 2


class ImageError(VPRError):
    """An image file that is missing, empty, corrupt or not an image."""


class NotAnImage(ImageError):
    """Bytes that no image decoder recognises (an HTTP server answers 415)."""


class ImageTooLarge(ImageError):
    """An image with more pixels than allowed (a decompression bomb, or over a server's limit)."""


class LabelError(VPRError):
    """Missing, malformed or inconsistent coordinates, headings or ground truth."""


class IndexFormatError(VPRError):
    """An index directory that is missing, partial, or built by another model or version."""


class CheckpointError(VPRError):
    """A checkpoint that cannot be loaded safely or does not match a known layout."""


class DependencyError(VPRError):
    """An optional dependency (FAISS) that is not installed."""


class OutputError(VPRError):
    """An output path vpr must not write to: a user's own files, an input folder, or no write permission."""


class TrainingError(VPRError):
    """A training run that cannot go on: its loss or weights became NaN or infinite (it diverged)."""
