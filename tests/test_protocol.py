"""Request parsing as iipsrv does it (spec §3): tokens, decoding, typed commands."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iipserver.encoders import OutputFormat
from iipserver.errors import BannerError, ProtocolError
from iipserver.protocol.commands import (
    Colormap,
    Contrast,
    Fif,
    Gamma,
    Ignored,
    Invalid,
    Invert,
    MinMax,
    Obj,
    Quality,
    Rotate,
    Sequence,
    Tile,
    Unknown,
    atof,
    atoi,
    parse,
)
from iipserver.protocol.query import Token, request_string, tokenize, url_decode


@pytest.mark.parametrize(
    ("request_text", "expected"),
    [
        ("FIF=a.tif&OBJ=IIP,1.0", [("FIF", "a.tif"), ("OBJ", "IIP,1.0")]),
        ("a&&b", [("a", "a"), ("b", "b")]),
        ("INV", [("INV", "INV")]),
        ("OBJ", [("OBJ", "OBJ")]),
        ("INV=&=x&OBJ=", []),
        ("CTW=1=2", [("CTW", "1=2")]),
        ("&&&", []),
        ("", []),
    ],
)
def test_tokenize(request_text, expected):
    assert [(t.name, t.argument) for t in tokenize(request_text)] == expected


def test_token_key_is_case_folded_but_name_kept():
    token = tokenize("Fif=x")[0]
    assert token == Token("Fif", "x")
    assert token.key == "fif"


@pytest.mark.parametrize(
    ("raw", "decoded"),
    [
        ("a%20b", "a b"),
        ("a+b", "a b"),
        ("%2e%2e/x", "../x"),
        ("%252e", "%2e"),
        ("100%", "100%"),
        ("%zz", "%zz"),
        ("%4", "%4"),
        ("a%00b", "a\x00b"),
        ("%C3%A9t%C3%A9.tif", "été.tif"),
        ("plain.tif", "plain.tif"),
    ],
)
def test_url_decode(raw, decoded):
    assert url_decode(raw) == decoded


def test_url_decode_keeps_undecodable_bytes():
    out = url_decode("%ff.tif")
    assert out.encode("utf-8", "surrogateescape") == b"\xff.tif"


def test_atoi_atof_follow_c_prefix_rules():
    assert atoi(" 12abc") == 12
    assert atoi("-3") == -3
    assert atoi("2.9") == 2
    assert atof("0.4545x") == pytest.approx(0.4545)
    assert atof("1e2") == 100.0
    assert atof(".5") == 0.5


def test_parse_builds_typed_commands_in_order():
    cmds = parse(
        "fif=a%20b.tif&Obj=Max-Size&QLT=150&SDS=3&MINMAX=2:0.5,10&CNT=1.5&GAM=log&INV"
        "&CMP=Jet&ROT=!180&JTL=2,5&PTL=1,0&LYR=2&foo=1"
    )
    assert cmds == [
        Fif("a b.tif"),
        Obj("max-size"),
        Quality(100),
        Sequence(3, 3),
        MinMax(1, 0.5, 10.0),
        Contrast(1.5),
        Gamma(log=True),
        Invert(),
        Colormap("jet"),
        Rotate(0.0, 2),
        Tile(2, 5),
        Tile(1, 0, OutputFormat.PNG),
        Ignored("lyr"),
        Unknown("foo"),
    ]


def test_minmax_forms():
    assert parse("MINMAX=-:1,2") == [MinMax(None, 1.0, 2.0)]
    assert parse("MINMAX=0:1,2") == [MinMax(-1, 1.0, 2.0)]  # channel < 1: ignored when run
    assert parse("ROT=90") == [Rotate(90.0, 0)]
    assert parse("JTL=3") == [Tile(3, 3)]
    assert parse("JTLS=0,2,5,90") == [Tile(2, 5, angles=(0, 90))]


def test_unparsable_arguments_become_deferred_errors():
    (cmd,) = parse("JTL=abc")
    assert isinstance(cmd, Invalid)
    assert isinstance(cmd.error, ProtocolError)
    assert cmd.error.lines == [("2 1", "JTL=abc")]
    (neg,) = parse("JTL=-1,0")
    assert isinstance(neg, Invalid)
    assert isinstance(neg.error, BannerError)
    (gam,) = parse("GAM=bright")
    assert isinstance(gam, Invalid)


def test_uri_map_rewrites_path_requests():
    env = {"QUERY_STRING": "", "REQUEST_URI": "/iiif/a.tif/full/max/0/default.jpg?x=1"}
    assert request_string(env, "iiif=>IIIF") == "iiif=a.tif/full/max/0/default.jpg"
    assert request_string({"QUERY_STRING": "FIF=x"}, "iiif=>IIIF") == "FIF=x"
    assert request_string({"QUERY_STRING": "FIF=x"}, "") == "FIF=x"


@given(st.text(alphabet="FIJTLOBQMNX=&,:.-%0123456789abcdef!;[] ", max_size=60))
def test_parse_never_raises(text):
    for command in parse(text):
        assert command is not None


@given(st.text(max_size=40))
def test_url_decode_never_raises(text):
    url_decode(text.encode("utf-8", "surrogatepass").decode("latin-1"))
