"""Names of video frames: `run.mp4#t=12.500` is the frame of `run.mp4` shown 12.5 s after the video's start (the
Media Fragments `#t=` form). Such a name stands for its frame wherever vpr takes an image path, so a video's
frames are indexed, cached, shown and re-ranked like files without ever being written to disk."""

from __future__ import annotations

import os
from pathlib import Path

VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm", ".mts", ".ts")
MARK = "#t="


def frame_path(video: Path, seconds: float) -> Path:
    """The name of the frame of `video` at `seconds` (millisecond precision, as frames are listed)."""
    return Path(f"{video}{MARK}{seconds:.3f}")


def split_frame(path: str | os.PathLike) -> tuple[Path, float] | None:
    """(video, seconds) when `path` names a frame of a video (and is no file of that name), else None."""
    text = os.fspath(path)
    video, mark, seconds = text.rpartition(MARK)
    if not mark or Path(video).suffix.lower() not in VIDEO_EXTENSIONS or os.path.lexists(text):
        return None
    try:
        value = float(seconds)
    except ValueError:
        return None
    return (Path(video), value) if value >= 0 else None


def holder(path: str | os.PathLike) -> Path:
    """The file or folder an image's data lives in: a frame's video, else the image's folder."""
    frame = split_frame(path)
    return frame[0] if frame is not None else Path(path).parent
