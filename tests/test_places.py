"""`vpr places`: located images grouped into places for place-batch training, written as a GSV-Cities-style CSV;
places too small or too close to a larger one are left out and counted, and the file is only replaced if vpr wrote it."""

import csv
import json

import numpy as np
from PIL import Image

from conftest import ZONE, run_cli
from vpr.data.geo import format_at_name


def located_folder(root, spots):
    """One tiny JPEG per (east, north, heading, timestamp)."""
    root.mkdir(parents=True)
    for i, (east, north, heading, stamp) in enumerate(spots):
        name = format_at_name(east, north, *ZONE, heading=heading, pano_id=f"pano{i:03d}", timestamp=stamp)
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(root / name)
    return root


def test_places_group_by_position_and_heading_and_leave_out_what_a_batch_cannot_use(tmp_path, monkeypatch, capsys):
    spots = [(550000 + dx, 4180000, 0, "202105") for dx in (0, 2, 4, 6)]            # place A: 4 images
    spots += [(550100 + dx, 4180000, 90, "202106") for dx in (0, 3, 6, 9, 1)]        # place B: 5 images
    spots += [(550100, 4180000, 270, "") for _ in range(4)]                          # B's spot facing the other way
    spots += [(550115, 4180000, 90, "")] * 2 + [(550122, 4180000, 90, "")] * 2     # 4 images 15-22 m from B
    spots += [(550300, 4180000, 0, "")]                                              # alone
    data = located_folder(tmp_path / "photos", spots)
    out = tmp_path / "places.csv"
    code, stdout, err = run_cli(monkeypatch, capsys, "places", data, "--out", out, "--radius", 10, "--heading", 45,
                                "--spacing", 25, "--map", tmp_path / "map.png", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert (report["places"], report["images"], report["kept"]) == (3, 18, 13)
    assert report["left_out"] == {"in a place of fewer than 4 images": 1, "in a place within 25 m of a larger one": 4}
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid", "image"]
    by_place = {}
    for row in rows:
        by_place.setdefault(row["place_id"], []).append(row)
    assert sorted(len(v) for v in by_place.values()) == [4, 4, 5]
    assert {row["panoid"] for row in by_place["0"]} == {"pano000", "pano001", "pano002", "pano003"}
    assert (by_place["0"][0]["year"], by_place["0"][0]["month"]) == ("2021", "5")
    assert all(row["image"].startswith("photos/") and (tmp_path / row["image"]).is_file() for row in rows)  # from the CSV
    assert abs(float(by_place["0"][0]["lat"]) - 37.77) < 0.1 and (tmp_path / "map.png").stat().st_size > 0


def test_places_refuse_to_replace_a_file_vpr_did_not_write(tmp_path, monkeypatch, capsys):
    data = located_folder(tmp_path / "photos", [(550000 + dx, 4180000, 0, "") for dx in range(4)])
    out = tmp_path / "mine.csv"
    out.write_text("my own notes\n")
    code, _, err = run_cli(monkeypatch, capsys, "places", data, "--out", out)
    assert code != 0 and "not a places file written by vpr" in err and out.read_text() == "my own notes\n"
    code, _, err = run_cli(monkeypatch, capsys, "places", data, "--out", tmp_path / "places.txt")
    assert code != 0 and "ends in .csv" in err
    code, _, err = run_cli(monkeypatch, capsys, "places", data, "--out", tmp_path / "p.csv")
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "places", data, "--out", tmp_path / "p.csv", "--radius", 2)
    assert code == 0, err  # its own file is replaced
