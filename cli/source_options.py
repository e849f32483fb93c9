"""Where images come from, declared once for `build-index`, `query` and `eval`: a video's frame rate and GPS
track, writing its frames out, and leaving out the photos of a located folder that have no position."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import console, err_console
from vpr import api

FPS = typer.Option(1.0, "--fps", min=0.001, max=1000.0, help="For a video: frames per second taken from it (each named VIDEO#t=SECONDS).")
TRACK = typer.Option(None, "--track", help="For a video: a GPS track (.gpx, or .csv with time,lat,lon or seconds,lat,lon) that locates its frames; frames outside it are left out.")
VIDEO_START = typer.Option(None, "--video-start", help="For a video with a GPS track: when it started (ISO 8601, e.g. 2024-05-01T13:45:30Z), where its creation time is missing or wrong.")
TRACK_OFFSET = typer.Option(0.0, "--track-offset", min=-1e9, max=1e9, help="For a video with a GPS track: seconds added to each frame's time before it is looked up in the track.")
SAVE_FRAMES = typer.Option(None, "--save-frames", help="For a video: also write its frames as JPEGs into this new folder (@-named when located, so it is an image set itself).")
BENCHMARK = typer.Option(None, "--benchmark", help="A standard benchmark read from its authors' own files under --root: pitts30k, pitts250k, tokyo247, msls-val, nordland, sped or vpr-bench (docs/benchmark-formats.md).")
ROOT = typer.Option(None, "--root", help="With --benchmark: the folder that holds the benchmark as its authors distribute it.")
GT_KIND = typer.Option(None, "--gt-kind", help="With --gt: the file's format, csv, gsv-cities, netvlad-mat, vpr-bench, patch-netvlad or msls (default: told from the file).")
SKIP_UNLOCATED = typer.Option(False, "--skip-unlocated", help="In a folder of located photos (@ names or EXIF GPS): leave out the ones without a position (listed) instead of stopping at the first.")


def video_options(fps: float, track: Optional[Path], video_start: Optional[str], track_offset: float) -> api.VideoOptions:
    """The `VideoOptions` the video flags give."""
    return api.VideoOptions(fps=fps, track=track, start=video_start, offset=track_offset)


def load_source(source: Path, video: api.VideoOptions, skip_unlocated: bool, save_frames: Optional[Path],
                quiet: bool) -> api.GeoImageSet:
    """The image set of a folder, manifest or video, saying what it left out and writing the frames if asked."""
    images = api.images(source, skip_unlocated=skip_unlocated, video=video)
    report_left_out(images)
    write_frames(images, save_frames, quiet)
    return images


def report_left_out(images: api.GeoImageSet) -> None:
    """One line on stderr for the images of a source that were left out (no position, outside the track)."""
    if images.left_out:
        path, why = images.left_out[0]
        count = len(images.left_out)
        err_console.print(f"note: {count} image{'s' if count > 1 else ''} of {images.source} left out ({why}: "
                          f"{path}{' and others' if count > 1 else ''})", soft_wrap=True)


def write_frames(images: api.GeoImageSet, out: Optional[Path], quiet: bool) -> None:
    """`--save-frames`: the video's frames as JPEGs in a new folder."""
    if out is None:
        return
    from vpr.errors import UsageError

    if not str(images.source).lower().endswith(api.VIDEO_EXTENSIONS):
        raise UsageError(f"--save-frames writes a video's frames; {images.source} is not a video")
    api.save_frames(images, out)
    if not quiet:
        console.print(f"{len(images)} frames written to {out}")


def benchmark_source(name: Optional[str], root: Optional[Path], data: Optional[Path], data_name: str):
    """The benchmark `--benchmark NAME --root DIR` names (None without one), refusing a DATA argument beside it."""
    from vpr.errors import UsageError

    if name is None:
        if root is not None:
            raise UsageError("--root is the folder of a --benchmark; add --benchmark NAME")
        if data is None:
            raise UsageError(f"missing {data_name}: give a folder, manifest or video, or --benchmark NAME --root DIR")
        return None
    if name not in api.BENCHMARKS:
        raise UsageError(f"--benchmark {name}: not a benchmark vpr knows; use one of {', '.join(api.BENCHMARKS)}")
    if data is not None:
        raise UsageError(f"--benchmark reads its own images; drop {data} or drop --benchmark")
    if root is None:
        raise UsageError(f"--benchmark {name} needs --root DIR, the folder that holds it")
    return api.load_benchmark(name, root)

