"""Errors a user can cause: one-line messages that name the file and the fix.

The CLI maps `exit_code` to the process exit status (1 runtime failure, 2 usage error).
"""


class VPRError(Exception):
    """Base of every error caused by user input; its message is shown without a traceback."""

    exit_code = 1


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
