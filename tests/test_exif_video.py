"""Photos located by their EXIF GPS, videos as ordered frames located by a GPS track, and frames written out only
when asked: the same image sets, indexes and answers as `@`-named files give."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin

from conftest import SHARED_DATA, place_image, run_cli, write_places
from vpr import api
from vpr.data.geo import parse_at_name, utm_to_latlon
from vpr.errors import ImageError, LabelError, UsageError

av = pytest.importorskip("av")
R = TiffImagePlugin.IFDRational


def dms(value: float) -> tuple:
    value = abs(value)
    degrees, minutes = int(value), int((abs(value) - int(value)) * 60)
    return R(degrees, 1), R(minutes, 1), R(round((value - degrees - minutes / 60) * 3600 * 1e6), 1_000_000)


def geotag(src: Path, dst: Path, *, heading: bool = True, when: str | None = None) -> None:
    """Copy an `@`-named photo to `dst` with its position (and heading, capture time) in EXIF instead."""
    name = parse_at_name(src)
    lat, lon = utm_to_latlon(name.east, name.north, name.zone_number, name.zone_letter)
    exif = Image.Exif()
    gps = exif.get_ifd(0x8825)
    gps.update({1: "N" if lat >= 0 else "S", 2: dms(lat), 3: "E" if lon >= 0 else "W", 4: dms(lon)})
    if heading and name.heading is not None:
        gps.update({16: "T", 17: R(round(name.heading * 100), 100)})
    if when is not None:
        exif.get_ifd(0x8769).update({36867: when, 36881: "+02:00"})
    Image.open(src).save(dst, quality=95, exif=exif)


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    """The same places twice: `@`-named, and as IMG_N.jpg copies located by EXIF GPS."""
    root = tmp_path_factory.mktemp("exif")
    write_places(root / "named", 6, seed=3)
    for split in ("database", "queries"):
        (root / "tagged" / split).mkdir(parents=True)
        for i, path in enumerate(sorted((root / "named" / split).iterdir())):
            geotag(path, root / "tagged" / split / f"IMG_{i:04d}.jpg", when=f"2024:05:01 10:00:{i:02d}")
    return root


def test_exif_gps_locates_photos_as_their_names_do(tagged):
    named, located = api.images(tagged / "named" / "database"), api.images(tagged / "tagged" / "database")
    assert located.zone == named.zone == (10, "S")
    assert np.abs(located.utm - named.utm).max() < 1e-3
    assert np.allclose(located.heading, named.heading)
    assert np.diff(located.time).tolist() == [1.0] * 5  # DateTimeOriginal with its offset: seconds apart


def test_a_folder_mixing_located_and_unlocated_photos_names_the_first_unlocated(tagged, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in sorted((tagged / "tagged" / "database").iterdir())[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    Image.fromarray(place_image(np.random.default_rng(0))).save(folder / "IMG_9999.jpg")
    with pytest.raises(LabelError, match=r"IMG_9999\.jpg: no GPS position in its EXIF, while 3 of the 4.*skip_unlocated"):
        api.images(folder)
    kept = api.images(folder, skip_unlocated=True)
    assert len(kept) == 3 and kept.left_out == [(folder / "IMG_9999.jpg", "no GPS position in its EXIF")]


def test_photos_without_exif_gps_stay_an_unlabelled_set(tmp_path):
    for i in range(3):
        Image.fromarray(place_image(np.random.default_rng(i))).save(tmp_path / f"{i}.jpg")
    images = api.images(tmp_path)
    assert len(images) == 3 and images.utm is None and images.left_out == []


def test_manifest_values_win_over_exif_and_empty_cells_take_it(tagged, tmp_path):
    photos = sorted((tagged / "tagged" / "database").iterdir())
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,lat,lon,heading\n{photos[0]},37.75,-122.5,10\n{photos[1]},,,\n")
    images = api.images(manifest)
    exif = api.images(tagged / "tagged" / "database")
    first = api.images(tmp_path / "m.csv")
    lat, lon = utm_to_latlon(*first.utm[0], *first.zone)
    assert (round(lat, 6), round(lon, 6)) == (37.75, -122.5) and images.heading[0] == 10.0  # the CSV wins
    assert np.abs(images.utm[1] - exif.utm[1]).max() < 1e-3 and images.heading[1] == exif.heading[1]  # EXIF fills in


def test_cli_indexes_and_evaluates_exif_photos_like_named_ones(tagged, tmp_path, monkeypatch, capsys):
    recalls = {}
    for kind in ("named", "tagged"):
        code, _, err = run_cli(monkeypatch, capsys, "build-index", tagged / kind / "database", "--out", tmp_path / kind,
                               "--resize", "48x64", "--dim", "64", "--no-cache", "--device", "cpu", "--workers", 0)
        assert code == 0, err
        code, out, err = run_cli(monkeypatch, capsys, "eval", tagged / kind / "queries", "--index", tmp_path / kind,
                                 "--json", "--device", "cpu", "--workers", 0)
        assert code == 0, err
        recalls[kind] = json.loads(out)["recall"]
    assert recalls["tagged"] == recalls["named"] and recalls["tagged"]["R@1"] == 100.0


def write_video(path: Path, frames: list[np.ndarray], fps: int = 10, creation: str | None = None) -> None:
    """An H.264 video of `frames` at `fps`, the way a camera app writes one."""
    container = av.open(str(path), "w")
    if creation:
        container.metadata["creation_time"] = creation
    stream = container.add_stream("libx264", rate=fps)
    stream.height, stream.width = frames[0].shape[:2]
    stream.pix_fmt, stream.options = "yuv420p", {"crf": "12", "g": "8"}
    for frame in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


@pytest.fixture(scope="module")
def drive(tmp_path_factory):
    """A 4 s drive at 10 fps past 8 distinct places (5 frames each), a GPX track 10 m per frame heading east."""
    root = tmp_path_factory.mktemp("drive")
    rng = np.random.default_rng(7)
    places = [place_image(rng, (48, 64)) for _ in range(8)]
    frames = [places[i // 5] for i in range(40)]
    write_video(root / "run.mp4", frames, creation="2024-05-01T12:00:00.000000Z")
    points = []
    for second in range(0, 5):
        lat, lon = utm_to_latlon(550000.0 + 100.0 * second, 4180000.0, 10, "S")
        points.append(f'<trkpt lat="{lat:.8f}" lon="{lon:.8f}"><time>2024-05-01T12:00:{second:02d}Z</time></trkpt>')
    (root / "run.gpx").write_text('<?xml version="1.0"?><gpx version="1.1" xmlns="http://www.topografix.com/GPX/1/1">'
                                  f"<trk><trkseg>{''.join(points)}</trkseg></trk></gpx>")
    return root, frames


def test_a_video_is_its_frames_at_the_rate_asked_in_order(drive):
    root, frames = drive
    images = api.images(root / "run.mp4", video=api.VideoOptions(fps=2))
    assert [p.name for p in images.paths] == [f"run.mp4#t={t:.3f}" for t in np.arange(0, 4, 0.5)]
    assert images.utm is None and images.time.tolist() == list(np.arange(0, 4, 0.5))
    from vpr.data.images import load_rgb

    for path, i in zip(images.paths[::-1], range(35, -1, -5)):  # read backwards: every frame found by seeking
        decoded = np.asarray(load_rgb(path), dtype=np.float32)
        errors = [np.abs(decoded - other).mean() for other in np.asarray(frames[::5], dtype=np.float32)]
        assert int(np.argmin(errors)) == i // 5 and min(errors) < 4.0


def test_a_forked_worker_reads_frames_while_its_parent_holds_videos_open(drive, tmp_path):
    """DataLoader workers are forked from a process that may hold decoders open: a worker opening more videos
    than it keeps must not close the parent's (their threads stayed behind; closing one waited forever)."""
    import multiprocessing
    import shutil

    from vpr.data.video import OPEN_VIDEOS, read_frame

    root, _ = drive
    videos = [shutil.copyfile(root / "run.mp4", tmp_path / f"v{i}.mp4") for i in range(OPEN_VIDEOS + 1)]
    threads = len(os.listdir("/proc/self/task"))
    for video in videos[:OPEN_VIDEOS]:
        read_frame(video, 0.5)
    assert len(os.listdir("/proc/self/task")) == threads  # decoding starts no FFmpeg threads to leave behind
    worker = multiprocessing.get_context("fork").Process(target=read_frame, args=(videos[-1], 0.5))
    worker.start()
    worker.join(60)
    if worker.is_alive():
        worker.kill()
    assert worker.exitcode == 0


def test_a_gps_track_locates_frames_by_the_videos_clock(drive):
    root, _ = drive
    images = api.images(root / "run.mp4", video=api.VideoOptions(fps=2, track=root / "run.gpx"))
    assert len(images) == 8 and images.zone == (10, "S")
    assert np.allclose(images.utm[:, 0] - 550000.0, 100.0 * np.arange(0, 4, 0.5), atol=0.05)
    assert np.allclose(images.heading, 90.0, atol=0.1)  # driving east
    shifted = api.images(root / "run.mp4", video=api.VideoOptions(fps=2, track=root / "run.gpx", offset=1.5))
    assert len(shifted) == 6 and [why for _, why in shifted.left_out] == ["outside the GPS track"] * 2
    with pytest.raises(LabelError, match="no frame of .* falls within the track's time span.*video_start"):
        api.images(root / "run.mp4", video=api.VideoOptions(fps=2, track=root / "run.gpx", start="2030-01-01T00:00:00Z"))


def test_video_build_query_and_frames_through_the_cli(drive, tmp_path, monkeypatch, capsys):
    root, _ = drive
    video = ["--fps", "2", "--track", root / "run.gpx"]
    code, out, err = run_cli(monkeypatch, capsys, "build-index", root / "run.mp4", *video, "--out", tmp_path / "idx",
                             "--resize", "48x64", "--dim", "64", "--device", "cpu", "--workers", 0, "--json")
    assert code == 0, err
    assert json.loads(out)["indexed"] == 8
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in written if p.suffix in (".jpg", ".png", ".bmp")]  # no frame written to disk
    code, out, err = run_cli(monkeypatch, capsys, "query", root / "run.mp4", "--fps", "2", "--index", tmp_path / "idx",
                             "-k", 1, "--json", "--device", "cpu")
    assert code == 0, err
    assert [r["matches"][0]["path"] for r in json.loads(out)] == [str(root / f"run.mp4#t={t:.3f}") for t in np.arange(0, 4, 0.5)]
    code, _, err = run_cli(monkeypatch, capsys, "eval", root / "run.mp4", *video, "--index", tmp_path / "idx",
                           "--save-frames", tmp_path / "frames", "--device", "cpu", "--workers", 0)
    assert code == 0, err
    saved = api.images(tmp_path / "frames")  # @-named: a labelled image set
    assert len(saved) == 8 and np.abs(saved.utm - api.images(root / "run.mp4", video=api.VideoOptions(
        fps=2, track=root / "run.gpx")).utm).max() < 0.01
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code, _, err = run_cli(monkeypatch, capsys, "eval", root / "run.mp4", *video, "--index", tmp_path / "idx",
                           "--save-frames", tmp_path / "mine", "--device", "cpu")
    assert code == 1 and "files vpr did not write (notes.txt)" in err and (tmp_path / "mine" / "notes.txt").exists()


def test_bad_videos_and_tracks_are_one_line_errors(drive, tmp_path):
    root, _ = drive
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 1000)
    with pytest.raises(ImageError, match="broken.mp4: not a video PyAV can read") as info:
        api.images(broken)
    assert "\n" not in str(info.value)
    bad = tmp_path / "bad.csv"
    bad.write_text("time,lat,lon\n2024-05-01T12:00:00Z,37.7,abc\n")
    with pytest.raises(LabelError, match=r"bad.csv:2: time, lat and lon must be numbers"):
        api.images(root / "run.mp4", video=api.VideoOptions(track=bad))
    with pytest.raises(UsageError, match="fps 0: must be a positive number"):
        api.VideoOptions(fps=0)


@pytest.mark.skipif(not (SHARED_DATA / "nordland_seqslam_64x32").is_dir(), reason="shared Nordland absent")
def test_nordland_as_videos_matches_its_frames(tmp_path, monkeypatch, capsys):
    """Real frames: 200 Nordland summer frames as an H.264 video describe as the files do (thumbnail descriptors;
    dark frames are near-uniform, so each frame is compared with its own file, not searched among all)."""
    names = sorted((SHARED_DATA / "nordland_seqslam_64x32" / "summer").glob("*.png"))[:200]
    write_video(tmp_path / "summer.mp4", [np.asarray(Image.open(p).convert("RGB")) for p in names])
    model, _ = api.new_model("pixels", head="patchnorm")
    frames = api.describe(model, api.images(tmp_path / "summer.mp4", video=api.VideoOptions(fps=10)).paths)
    files = api.describe(model, names)
    assert frames.shape == files.shape == (200, model.config.descriptor_dim)
    same = np.einsum("ij,ij->i", frames, files)  # each frame's descriptor against its own file's
    assert np.median(same) > 0.95 and np.mean(same > 0.8) >= 0.9
