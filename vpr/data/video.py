"""A video as an image set (PyAV, the `media` extra): frames at a chosen rate, named by their time
(`vpr.data.frames`), in order for sequence matching, located by a GPS track when one is given.

Listing reads only the packets' timestamps (no decoding); a frame is decoded when it is read, by a reader that
keeps each video open and decodes forward from where it stopped, so frames read in order cost one pass.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vpr.data.datasets import GeoImageSet
from vpr.data.frames import VIDEO_EXTENSIONS, frame_path
from vpr.data.tracks import locate, parse_time, read_track
from vpr.errors import DependencyError, ImageError, LabelError, UsageError

__all__ = ["VIDEO_EXTENSIONS", "VideoOptions", "frame_times", "load_video", "read_frame", "save_frames"]
FORWARD_S = 10.0  # a frame at most this far ahead of the last one read is reached by decoding forward, not seeking
OPEN_VIDEOS = 4


@dataclass(frozen=True)
class VideoOptions:
    """How a video becomes images: `fps` frames per second; `track` (GPX or CSV) locates them, matched to the
    video's clock by its creation time or `start` (ISO 8601), plus `offset` seconds."""

    fps: float = 1.0
    track: Path | None = None
    start: str | None = None
    offset: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.fps, (int, float)) and 0 < self.fps <= 1000):
            raise UsageError(f"`fps` {self.fps}: must be a positive number of frames per second up to 1000")
        if self.start is not None and parse_time(self.start) is None:
            raise UsageError(f"`video_start` {self.start!r}: not an ISO 8601 time such as 2024-05-01T13:45:30Z")


def _av():
    """PyAV, or a `DependencyError` saying how to install it."""
    try:
        import av
    except ImportError:
        raise DependencyError("reading videos needs PyAV: pip install -e '.[media]'") from None
    return av


def _open(video: Path):
    """The open container and its first video stream, or an `ImageError` naming the file."""
    av = _av()
    try:
        container = av.open(str(video))
    except (av.error.FFmpegError, OSError) as exc:
        raise ImageError(f"{video}: not a video PyAV can read ({str(exc)[:80]}); re-copy or convert it") from None
    if not container.streams.video:
        container.close()
        raise ImageError(f"{video}: holds no video stream")
    return container, container.streams.video[0]


def frame_times(video: Path, fps: float) -> list[float]:
    """Seconds from the start of the frames kept at `fps`: for each tick k / fps, the first frame at or after it
    (from the packets' timestamps alone)."""
    container, stream = _open(video)
    try:
        stamps = sorted(float(packet.pts * stream.time_base) for packet in container.demux(stream) if packet.pts is not None)
    except _av().error.FFmpegError as exc:
        raise ImageError(f"{video}: corrupt video ({str(exc)[:80]}); re-copy or convert it") from None
    finally:
        container.close()
    if not stamps:
        raise ImageError(f"{video}: holds no frames")
    times = np.asarray(stamps) - stamps[0]
    kept, tick = [], 0.0
    for t in times:
        if t >= tick - 1e-6:
            kept.append(round(float(t), 3))
            tick = (int(t * fps + 1e-6) + 1) / fps
    return kept


class _Reader:
    """One open video and where its decoder stands."""

    def __init__(self, video: Path) -> None:
        self.container, self.stream = _open(video)
        self.stream.thread_count = 1  # no FFmpeg threads here or in `to_image` (see `read`)
        self.video = video
        self.first = None
        self.frames = None
        self.last = float("inf")

    def read(self, seconds: float) -> Image.Image:
        """The first frame at or after `seconds` (frame times as `frame_times` lists them)."""
        av = _av()
        base = self.stream.time_base
        if self.first is None:
            self.first = min(float(p.pts * base) for p in self.container.demux(self.stream) if p.pts is not None)
            self.frames, self.last = None, float("inf")
        if self.frames is None or not self.last + 1e-3 < seconds <= self.last + FORWARD_S:  # else decode on from here
            self.container.seek(int((seconds + self.first) / base), stream=self.stream, backward=True, any_frame=False)
            self.frames = self.container.decode(self.stream)
        try:
            for frame in self.frames:
                at = float(frame.pts * base) - self.first if frame.pts is not None else self.last
                if at + 1e-3 >= seconds:
                    self.last = at
                    # one thread: DataLoader workers decode in parallel, FFmpeg's slice threads gain nothing on
                    # one-slice frames, and a forked worker must not inherit a parent's idle FFmpeg threads
                    image = frame.to_image(threads=1)
                    turn = getattr(frame, "rotation", 0) or 0  # a phone's portrait video is stored turned
                    return image.rotate(turn, expand=True) if turn % 360 else image
        except av.error.FFmpegError as exc:
            raise ImageError(f"{self.video}: corrupt video near {seconds:.3f} s ({str(exc)[:80]})") from None
        raise ImageError(f"{self.video}: no frame at {seconds:.3f} s (the video is shorter); rebuild from the video")


_READERS: OrderedDict[Path, _Reader] = OrderedDict()  # this process's open videos, least recently read first
_INHERITED: list[_Reader] = []  # a forked parent's readers: never read, closed or freed here


def _forget_parent_readers() -> None:
    """In a forked child (a DataLoader worker), set the parent's readers aside for good: they share the parent's
    file offsets, and closing a decoder whose threads stayed in the parent would wait for them forever."""
    _INHERITED.extend(_READERS.values())
    _READERS.clear()


os.register_at_fork(after_in_child=_forget_parent_readers)


def read_frame(video: Path, seconds: float) -> Image.Image:
    """The RGB frame of `video` at `seconds`, decoded by this process's reader of it."""
    video = Path(video)
    if not video.is_file():
        raise ImageError(f"{video}: video not found; it was moved or deleted after the index was built")
    reader = _READERS.pop(video, None) or _Reader(video)
    _READERS[video] = reader
    while len(_READERS) > OPEN_VIDEOS:
        _, old = _READERS.popitem(last=False)
        old.container.close()
    return reader.read(seconds)


def video_start(video: Path, options: VideoOptions) -> float | None:
    """The video's start as UNIX seconds: `options.start`, else its creation time, else None."""
    if options.start is not None:
        return parse_time(options.start)
    container, stream = _open(video)
    try:
        stamp = container.metadata.get("creation_time") or stream.metadata.get("creation_time")
    finally:
        container.close()
    return parse_time(stamp) if stamp else None


def load_video(video: Path, options: VideoOptions | None = None) -> GeoImageSet:
    """The frames of `video` at `options.fps` as an image set in time order, located by `options.track`; frames
    outside the track's time span are left out (in `left_out`)."""
    options = options or VideoOptions()
    video = Path(video)
    times = np.array(frame_times(video, options.fps), dtype=np.float64)
    paths = [frame_path(video, t) for t in times]
    if options.track is None:
        return GeoImageSet(paths=paths, source=video, time=times)
    track = read_track(options.track)
    clock = times + options.offset
    if track.absolute:
        start = video_start(video, options)
        if start is None:
            raise UsageError(f"{video}: the video holds no creation time to match it to {track.path}'s clock; give "
                             "`video_start` (ISO 8601, e.g. 2024-05-01T13:45:30Z)")
        clock = clock + start
    utm, heading = locate(track, clock)
    inside = ~np.isnan(utm[:, 0])
    if not inside.any():
        raise LabelError(f"{track.path}: no frame of {video} falls within the track's time span "
                         f"({track.seconds[0]:.0f}-{track.seconds[-1]:.0f} s, frames at {clock[0]:.0f}-{clock[-1]:.0f} s); "
                         "check `video_start` or `track_offset`")
    keep = np.flatnonzero(inside)
    return GeoImageSet(
        paths=[paths[i] for i in keep], utm=utm[keep], heading=heading[keep], zone=track.zone, source=video,
        time=clock[keep], left_out=[(paths[i], "outside the GPS track") for i in np.flatnonzero(~inside)],
    )


SOFTWARE_TAG = 0x0131


def save_frames(images: GeoImageSet, out: Path, progress=None) -> Path:
    """Write a video's frames as JPEGs into the folder `out` (atomically, under its lock): `@`-named when they are
    located, so the folder is a labelled image set itself, else `VIDEO_SECONDS.jpg`; each tagged as vpr's."""
    from vpr.data.frames import split_frame
    from vpr.data.geo import format_at_name
    from vpr.data.images import load_rgb
    from vpr.fileio import atomic_dir, check_separate, output_lock

    out = Path(out)
    check_separate(out, images.input_folders(), "`save_frames`")
    with output_lock(out), atomic_dir(out, kind="frames", foreign=_foreign_frames, option="`save_frames`") as tmp:
        for i, path in enumerate(images.paths):
            video, seconds = split_frame(path) or (Path(path), 0.0)
            if images.utm is not None and images.zone is not None:
                name = format_at_name(*images.utm[i], *images.zone, heading=float(images.heading[i]),
                                      timestamp=f"{seconds:.3f}", note=video.stem)
            else:
                name = f"{video.stem}_{seconds:010.3f}.jpg"
            exif = Image.Exif()
            exif[SOFTWARE_TAG] = "vpr"
            load_rgb(path).save(tmp / name, format="JPEG", quality=95, exif=exif)
            if progress:
                progress(i + 1, len(images))
    return out


def _foreign_frames(folder: Path) -> list[str]:
    """Entries of a frames folder that are not JPEGs vpr wrote (its marker aside)."""
    from vpr.fileio import MARKER

    def ours(name: str) -> bool:
        try:
            with Image.open(folder / name) as img:
                return img.format == "JPEG" and img.getexif().get(SOFTWARE_TAG) == "vpr"
        except (OSError, ValueError, SyntaxError):
            return False

    return [name for name in os.listdir(folder) if name != MARKER and not ours(name)]
