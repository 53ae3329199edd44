"""FITS headers in ImageDescription: parsing, CD matrices, formatting, OBJ=subject."""

import math

import pytest
from images import pyramid_levels, write_pyramid
from wsgi_client import call

from iipserver import fitsheader as fh
from iipserver.app import make_app
from iipserver.settings import Settings


def header(*cards):
    text = "".join(c.ljust(80) for c in (*cards, "END"))
    return text.ljust(2880)


CDELT_PC = header(
    "SIMPLE  =                    T / conforms",
    "BITPIX  =                  -32",
    "NAXIS   =                    2",
    "NAXIS1  =                  300",
    "NAXIS2  =                  200",
    "CTYPE1  = 'RA---TAN'           / projection",
    "CTYPE2  = 'DEC--TAN'",
    "CRVAL1  =            150.11916",
    "CRVAL2  =              2.20583",
    "CRPIX1  =                150.5",
    "CRPIX2  =                100.5",
    "CDELT1  =            -5.6E-05",
    "CDELT2  =             5.6E-05",
    "PC1_1   =   0.8660254037844387",
    "PC1_2   =                 -0.5",
    "PC2_1   =                  0.5",
    "PC2_2   =   0.8660254037844387",
    "OBJECT  = 'It''s a field'      / with a quote",
    "CHAN0001= 'g       '",
    "COMMENT just words",
)


def test_parse_values_and_types():
    cards = fh.parse(CDELT_PC)
    values = fh.values(cards)
    assert values["SIMPLE"] is True
    assert values["NAXIS1"] == 300 and isinstance(values["NAXIS1"], int)
    assert values["CDELT1"] == pytest.approx(-5.6e-5)
    assert values["CTYPE1"] == "RA---TAN"
    assert values["OBJECT"] == "It's a field"
    assert values["CHAN0001"] == "g"
    assert cards[-1] == fh.Card("COMMENT", None, "just words")
    assert "END" not in values


def test_newline_separated_cards_parse_too():
    text = "\n".join(c.rstrip() for c in fh.split_cards(CDELT_PC) if c.strip())
    assert fh.values(fh.parse(text))["CRPIX2"] == 100.5


def test_cd_from_pc():
    cd = fh.cd_matrix(fh.values(fh.parse(CDELT_PC)))
    assert cd["CD1_1"] == pytest.approx(-5.6e-5 * 0.8660254037844387)
    assert cd["CD1_2"] == pytest.approx(-5.6e-5 * -0.5)
    assert cd["CD2_1"] == pytest.approx(5.6e-5 * 0.5)
    assert cd["CD2_2"] == pytest.approx(5.6e-5 * 0.8660254037844387)


def test_cd_from_crota2_and_plain_cdelt():
    cd = fh.cd_matrix({"CDELT1": -2.0, "CDELT2": 3.0, "CROTA2": 30.0})
    r = math.radians(30)
    assert cd == pytest.approx(
        {
            "CD1_1": -2 * math.cos(r),
            "CD1_2": -3 * math.sin(r),
            "CD2_1": -2 * math.sin(r),
            "CD2_2": 3 * math.cos(r),
        }
    )
    assert fh.cd_matrix({"CDELT1": 2.0, "CDELT2": 3.0}) == {
        "CD1_1": 2.0,
        "CD1_2": -0.0,
        "CD2_1": 0.0,
        "CD2_2": 3.0,
    }
    assert fh.cd_matrix({"CD1_1": 1.0, "CDELT1": 2.0}) is None
    assert fh.cd_matrix({"NAXIS": 2}) is None


def test_with_cd_matrix_adds_cards_readable_by_visiomatic_v2():
    out = fh.with_cd_matrix(CDELT_PC)
    assert len(out) % 80 == 0
    # VisiOmatic v2's readFITSKey: key padded to 8, '=', spaces, then a number
    import re

    number = r"=\ *([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
    for key in ("CD1_1", "CD1_2", "CD2_1", "CD2_2"):
        m = re.search(key.ljust(8) + number, out)
        assert m, key
    assert float(re.search("CD2_2   " + number, out).group(1)) == pytest.approx(5.6e-5 * 0.8660254)
    assert fh.with_cd_matrix(out) == out  # already has CD: unchanged
    assert out.index("CD1_1") < out.index("OBJECT")


def test_format_card():
    assert fh.format_card("NAXIS1", 300) == "NAXIS1  =                  300".ljust(80)
    assert fh.format_card("CTYPE1", "RA---TAN", "x") == "CTYPE1  = 'RA---TAN'           / x".ljust(
        80
    )
    assert fh.format_card("SIMPLE", True)[:30] == "SIMPLE  =                    T"
    assert fh.parse_value(fh.format_value(-5.6e-05)) == -5.6e-05
    assert fh.parse_value(fh.format_value(1.0)) == 1.0


def test_minimal_header():
    text = fh.minimal_header(300, 200, 3, 32, True)
    assert len(text) == 2880
    values = fh.values(fh.parse(text))
    assert (values["NAXIS1"], values["NAXIS2"], values["NAXIS3"], values["BITPIX"]) == (
        300,
        200,
        3,
        -32,
    )
    assert values["CD1_1"] == 1.0 and values["CD2_2"] == 1.0


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    import numpy as np

    d = tmp_path_factory.mktemp("fits")
    data = np.zeros((200, 300), np.float32)
    write_pyramid(d / "pc.tif", pyramid_levels(data), description=CDELT_PC)
    write_pyramid(d / "plain.tif", pyramid_levels(data), description="just a picture")
    return make_app(Settings.from_environ({"FILESYSTEM_PREFIX": f"{d}/"}))


def test_subject_carries_cd_matrix(app):
    body = call(app, "FIF=pc.tif&OBJ=subject").body.decode()
    value = fh.with_cd_matrix(CDELT_PC)
    assert body == f"\r\nsubject/{len(value)}:{value}\r\n"
    assert "CD1_1   =" in body


def test_subject_of_a_plain_description_is_unchanged(app):
    assert call(app, "FIF=plain.tif&OBJ=subject").body == b"\r\nsubject/14:just a picture\r\n"
