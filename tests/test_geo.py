"""`@` file names and UTM conversion."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vpr.data.geo import UTM_LETTERS, format_at_name, latlon_to_utm, parse_at_name, utm_to_latlon
from vpr.errors import LabelError

FULL = "@0543256.96@4178906.70@10@S@037.75591@-122.50896@q4LDr2l0F9ZE@@240@@@@201311@@.jpg"


def test_parses_the_full_community_name():
    name = parse_at_name(FULL)
    assert name.east == pytest.approx(543256.96) and name.north == pytest.approx(4178906.70)
    assert (name.zone_number, name.zone_letter) == (10, "S")
    assert name.lat == pytest.approx(37.75591) and name.lon == pytest.approx(-122.50896)
    assert name.heading == 240.0


def test_only_east_and_north_are_required():
    name = parse_at_name("@100.5@200.25@.jpg")
    assert (name.east, name.north, name.heading, name.zone_number) == (100.5, 200.25, None, None)


def test_heading_is_wrapped_to_0_360():
    assert parse_at_name("@1@2@10@S@@@@@370@@@@@@.jpg").heading == pytest.approx(10.0)


@pytest.mark.parametrize("bad", ["photo.jpg", "@abc@1@.jpg", "@1@@.jpg", "@nan@1@.jpg", "@inf@2@x@.jpg", "x@1@2@.jpg", "@@"])
def test_malformed_names_raise_label_error_naming_the_file(bad):
    with pytest.raises(LabelError, match="file name|not numbers"):
        parse_at_name(bad)


@given(st.text(max_size=80))
@settings(max_examples=300, deadline=None)
def test_any_name_parses_or_raises_label_error(text):
    try:
        name = parse_at_name(text.replace("/", "_") + ".jpg")
    except LabelError:
        return
    assert math.isfinite(name.east) and math.isfinite(name.north)
    assert name.heading is None or 0.0 <= name.heading < 360.0
    if name.zone_number is not None:  # a zone, when given, converts back to lat/lon (queries rely on it)
        assert name.zone_letter in UTM_LETTERS
        utm_to_latlon(500000.0, 4000000.0, name.zone_number, name.zone_letter)


@given(st.sampled_from(["", "10", "60", "0", "61", "x", "10.5"]), st.text(max_size=2))
@settings(max_examples=200, deadline=None)
def test_any_zone_fields_parse_to_a_usable_zone_or_raise(zone, letter):
    try:
        name = parse_at_name(f"@1@2@{zone}@{letter.replace('/', '_')}@@@@@@@@@@@.jpg")
    except LabelError:
        return
    assert (name.zone_number is None) == (name.zone_letter is None) == (zone == "")
    if name.zone_number is not None:
        utm_to_latlon(500000.0, 4000000.0, name.zone_number, name.zone_letter)


def test_format_then_parse_round_trips():
    name = parse_at_name(format_at_name(550123.456, 4180456.789, 10, "S", heading=123.4))
    assert name.east == pytest.approx(550123.46) and name.north == pytest.approx(4180456.79)
    assert name.heading == pytest.approx(123.4) and (name.zone_number, name.zone_letter) == (10, "S")
    lat, lon = utm_to_latlon(name.east, name.north, 10, "S")
    assert name.lat == pytest.approx(lat, abs=1e-6) and name.lon == pytest.approx(lon, abs=1e-6)


def test_latlon_to_utm_known_point():
    # Golden Gate Park, San Francisco: UTM zone 10S.
    east, north, number, letter = latlon_to_utm(37.76904, -122.48347)
    assert (number, letter) == (10, "S")
    assert east == pytest.approx(545490, abs=50) and north == pytest.approx(4180353, abs=50)
    back = utm_to_latlon(east, north, number, letter)
    assert back == pytest.approx((37.76904, -122.48347), abs=1e-6)


@pytest.mark.parametrize("lat,lon", [(91.0, 0.0), (-85.0, 10.0), (10.0, 200.0), (float("nan"), 1.0)])
def test_latlon_out_of_range_is_a_label_error(lat, lon):
    with pytest.raises(LabelError, match="out of range"):
        latlon_to_utm(lat, lon)


def test_zone_number_without_letter_is_refused_naming_the_file():
    with pytest.raises(LabelError) as info:
        parse_at_name("/data/db/@1@2@10@@@@@@@@@@@@.jpg")
    assert str(info.value).startswith("/data/db/@1@2@10@@@@@@@@@@@@.jpg: UTM zone 10 has no zone letter")
    assert UTM_LETTERS in str(info.value)


@pytest.mark.parametrize("letter", ["I", "O", "1", "A", "Y", "SS", "é"])
def test_invalid_zone_letter_is_refused_with_the_valid_letters(letter):
    with pytest.raises(LabelError) as info:
        parse_at_name(f"@1@2@10@{letter}@.jpg")
    assert f"zone letter {letter.upper()!r} is not valid; use one of CDEFGHJKLMNPQRSTUVWX" in str(info.value)


@pytest.mark.parametrize("zone", ["0", "61", "10.5", "x"])
def test_invalid_zone_number_is_refused(zone):
    with pytest.raises(LabelError, match=f"zone '{zone}' is not a zone number 1..60"):
        parse_at_name(f"@1@2@{zone}@S@.jpg")


@pytest.mark.parametrize("name", ["@1@2@.jpg", "@1@2@@@.jpg", "@1@2@@S@.jpg", "@1@2@10@s@.jpg"])
def test_names_without_a_zone_or_with_a_full_zone_are_accepted(name):
    parsed = parse_at_name(name)
    assert (parsed.zone_number, parsed.zone_letter) in {(None, None), (10, "S")}


def test_the_extension_is_not_a_field():
    assert parse_at_name("@1@2@10@S@@@@@90@@@@@@.jpg").heading == 90.0
    assert parse_at_name("@1@2@.jpg").zone_number is None
