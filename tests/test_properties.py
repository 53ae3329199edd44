"""Property-based tests of the query grammar and of the whole WSGI app (policy §2: no crash).

Hypothesis builds request strings from the real command names with random, huge, negative,
non-finite, empty and Unicode arguments, and whole WSGI requests (paths, methods, validators,
POST bodies). Every answer must be well formed: a status in 200–599, a Content-Type, a
Content-Length equal to the body's length, bytes for a body, a 500 only with the generic
body, no exception escaping the app, and quickly (no huge allocation). Runs are derandomised
so CI is reproducible. Each failure found is kept below as an explicit regression test
(tests/test_traversal.py covers path confinement).
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from images import pyramid_levels, rgb_image, smin_smax_tags, star_field, write_pyramid
from wsgi_client import Reply

from iipserver.app import make_app
from iipserver.errors import IIPServerError
from iipserver.protocol.commands import parse_tokens
from iipserver.protocol.query import tokenize, url_decode
from iipserver.settings import Settings

#: The command names of the IIP, VisiOmatic 3, IIIF, DeepZoom and Zoomify requests.
COMMANDS = [
    "FIF",
    "OBJ",
    "JTL",
    "JTLS",
    "PTL",
    "WTL",
    "TIL",
    "CVT",
    "WID",
    "HEI",
    "RGN",
    "QLT",
    "SDS",
    "MINMAX",
    "GAM",
    "CNT",
    "CMP",
    "INV",
    "CTW",
    "SHD",
    "COL",
    "PFL",
    "SPECTRA",
    "ROT",
    "LYR",
    "IIIF",
    "DeepZoom",
    "Zoomify",
    "CNV",
    "INFO",
    "CHAN",
    "MIX",
    "BRT",
    "VAL",
    "BIN",
    "STATUS",
]
IMAGES = ("rgb.tif", "star.tif", "missing.tif", "")
OBJECTS = [
    "IIP,1.0",
    "iip-server",
    "basic-info",
    "max-size",
    "tile-size",
    "resolution-number",
    "bits-per-channel",
    "min-max-sample-values",
    "resolutions",
    "horizontal-views",
    "vertical-views",
    "colorspace",
    "iip-opt-comm",
    "iip-opt-obj",
    "subject",
    "summary-info",
    "metadata",
    "stack",
    "dpi",
]
#: A generous bound per request on a 2-core machine (the real cost is a few milliseconds).
SLOW = 2.0
HYPOTHESIS = settings(
    max_examples=1000,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("properties")
    write_pyramid(d / "rgb.tif", pyramid_levels(rgb_image(300, 200)), photometric="rgb")
    star = star_field(200, 150, seed=3).astype(np.float32)
    write_pyramid(
        d / "star.tif",
        pyramid_levels(star),
        photometric="minisblack",
        extratags=smin_smax_tags([float(star.min())], [float(star.max())]),
    )
    return d


@pytest.fixture(scope="module")
def app(root: Path) -> Callable:
    env = {"FILESYSTEM_PREFIX": f"{root}/", "URI_MAP": "iiif=>IIIF", "STATUS_ENDPOINT": "1"}
    return make_app(Settings.from_environ(env))


def environ_for(
    query: str = "",
    path: str = "/fcgi-bin/iipsrv.fcgi",
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    content_length: str | None = None,
) -> dict:
    environ = {
        "REQUEST_METHOD": method,
        "QUERY_STRING": query,
        "REQUEST_URI": path + ("?" + query if query else ""),
        "SCRIPT_NAME": path,
        "PATH_INFO": "",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "HTTP_HOST": "localhost",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "CONTENT_LENGTH": str(len(body)) if content_length is None else content_length,
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": "http",
    }
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    return environ


def answer(app: Callable, environ: dict) -> Reply:
    """Call the app; an exception escaping it fails the test (pytest shows it)."""
    captured: dict = {}

    def start_response(status, headers, exc_info=None):
        assert isinstance(status, str) and status[:3].isdigit() and status[3] == " "
        captured["status"] = int(status[:3])
        captured["headers"] = list(headers)

    started = time.perf_counter()
    chunks = app(environ, start_response)
    body = b"".join(chunks)
    elapsed = time.perf_counter() - started
    assert elapsed < SLOW, f"{elapsed:.2f} s for {environ['QUERY_STRING'][:200]!r}"
    assert all(isinstance(chunk, bytes) for chunk in chunks)
    return Reply(captured["status"], captured["headers"], body)


def check_well_formed(reply: Reply, method: str = "GET") -> None:
    assert 200 <= reply.status <= 599
    for name, value in reply.headers:
        assert isinstance(name, str) and isinstance(value, str)
        assert "\r" not in value and "\n" not in value, (name, value)
        value.encode("latin-1")  # a header must be sendable
    if reply.status not in (204, 304):  # no content, no type
        assert reply.header("Content-Type"), reply.headers
    length = reply.header("Content-Length")
    if length is not None and method != "HEAD":
        assert int(length) == len(reply.body)
    if method == "HEAD":
        assert reply.body == b""
    if reply.status == 500 and method != "HEAD":
        assert reply.body == b"Internal server error"
    if reply.status >= 400:
        assert b"Traceback" not in reply.body


# --- strategies --------------------------------------------------------------------------

_ints = st.one_of(
    st.integers(-5, 300),
    st.integers(-(2**64), 2**64),
    st.sampled_from([2**31 - 1, 2**31, 2**63, -(2**31), 10**30]),
)
_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e309", "-0", "0.", ".5", "1e-400"]),
)
_numbers = st.one_of(_ints.map(str), _floats)
_junk = st.one_of(
    st.text(max_size=12),
    st.text(alphabet="%&=,:;[]!-+.^/\\0123456789abcdefABCDEF ", max_size=16),
    st.sampled_from(["%", "%0", "%zz", "%00", "%25", "%ff%fe", "%c0%ae", "\u2024", "\x00", "+"]),
)


def _listed(n: int, sep: str = ",") -> st.SearchStrategy[str]:
    return st.lists(_numbers, min_size=0, max_size=n).map(sep.join)


_arguments = st.one_of(
    st.just(""),
    _numbers,
    _listed(5),
    st.tuples(_numbers, _numbers).map(lambda t: f"{t[0]},{t[1]}"),
    st.tuples(_numbers, _listed(3)).map(lambda t: f"{t[0]}:{t[1]}"),
    st.tuples(_listed(2), _listed(2)).map(lambda t: f"{t[0]}:{t[1]}"),
    st.lists(_listed(3), max_size=3).map(lambda rows: "[" + ";".join(rows) + "]"),
    st.sampled_from(IMAGES),
    st.sampled_from(OBJECTS),
    st.sampled_from(["jpeg", "png", "webp", "tiff", "grey", "binary", "hot", "jet", "eq", "log"]),
    _junk,
)
_names = st.one_of(
    st.sampled_from(COMMANDS),
    st.sampled_from(COMMANDS).map(str.lower),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcxyz", min_size=0, max_size=6),
)


@st.composite
def _token(draw: st.DrawFn) -> str:
    name = draw(_names)
    shape = draw(st.integers(0, 9))
    if shape == 0:
        return name
    if shape == 1:
        return f"{name}=={draw(_arguments)}"
    if shape == 2:
        return f"={draw(_arguments)}"
    if name.upper() == "FIF":
        return f"{name}={draw(st.one_of(st.sampled_from(IMAGES), _junk))}"
    return f"{name}={draw(_arguments)}"


def _iiif_argument() -> st.SearchStrategy[str]:
    part = st.one_of(
        _arguments,
        st.sampled_from(["full", "max", "square", "0", "!90", "default.jpg", "gray.png", "^max"]),
        st.sampled_from(["pct:" + "9" * 400, "9" * 5000, "^pct:1e9", "!9,9", "info.json"]),
    )
    return st.tuples(st.sampled_from(IMAGES), st.lists(part, max_size=5)).map(
        lambda t: "/".join([t[0], *t[1]])
    )


_service_tokens = st.one_of(
    _iiif_argument().map(lambda a: "IIIF=" + a),
    st.tuples(st.sampled_from(IMAGES), _numbers, _numbers, _numbers, _junk).map(
        lambda t: f"DeepZoom={t[0]}_files/{t[1]}/{t[2]}_{t[3]}.{t[4] or 'jpg'}"
    ),
    st.tuples(st.sampled_from(IMAGES), _numbers, _numbers, _numbers, _numbers).map(
        lambda t: f"Zoomify={t[0]}/TileGroup{t[1]}/{t[2]}-{t[3]}-{t[4]}.jpg"
    ),
    st.sampled_from(IMAGES).map(lambda i: f"DeepZoom={i}.dzi"),
    st.sampled_from(IMAGES).map(lambda i: f"Zoomify={i}/ImageProperties.xml"),
)

#: Request strings as a WSGI server hands them over (the raw bytes as latin-1 text).
queries = st.one_of(
    st.lists(_token(), min_size=0, max_size=7).map("&".join),
    st.tuples(st.sampled_from(IMAGES[:2]), st.lists(_token(), max_size=6)).map(
        lambda t: "&".join([f"FIF={t[0]}", *t[1]])
    ),
    _service_tokens,
    st.text(max_size=40),
).map(lambda q: q.encode("utf-8", "surrogatepass").decode("latin-1"))


# --- properties --------------------------------------------------------------------------


@HYPOTHESIS
@given(query=queries)
def test_parsing_raises_only_our_errors(query):
    """commands.parse_tokens never raises, url_decode never raises (ValueError included)."""
    for token in tokenize(query):
        url_decode(token.argument)
    with contextlib.suppress(IIPServerError):
        parse_tokens(tokenize(query))


@HYPOTHESIS
@given(query=queries)
def test_every_query_gets_a_well_formed_answer(app, query):
    reply = answer(app, environ_for(query))
    check_well_formed(reply)
    assert reply.status != 500, query


@HYPOTHESIS
@given(query=queries, head=st.booleans())
def test_get_head_and_post_agree_on_the_status(app, query, head):
    method = "HEAD" if head else "POST"
    reply = answer(app, environ_for("", method=method, body=query.encode("utf-8", "replace")))
    check_well_formed(reply, method)


_paths = st.one_of(
    st.text(alphabet="/abcfiltx.%2e5c?#;\\", max_size=30).map(lambda p: "/" + p),
    st.tuples(st.sampled_from(IMAGES), _iiif_argument()).map(lambda t: f"/iiif/{t[1]}"),
    st.sampled_from(["/", "/iiif/", "/iiif", "//iiif//", "/iiif/rgb.tif", "/iiif/%2e%2e/"]),
    st.text(max_size=20).map(lambda p: "/iiif/" + p),
).map(lambda p: p.encode("utf-8", "surrogatepass").decode("latin-1"))
_junk_header = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255), max_size=40),
    st.sampled_from(
        [
            "*",
            '"abc"',
            'W/"x", "y"',
            ",,,",
            "Sat, 02 Mar 2024 03:04:05 GMT",
            "Sat, 99 Foo 2024 99:99:99 GMT",
            "Mon, 01 Jan 0001 00:00:00 GMT",
            "Fri, 31 Dec 9999 23:59:59 GMT",
            "-1",
            "0",
            "99999999999999999999",
        ]
    ),
)
_methods = st.sampled_from(["GET", "HEAD", "POST", "OPTIONS", "PUT", "DELETE", "get", "", "X" * 50])


@HYPOTHESIS
@given(
    path=_paths,
    query=st.one_of(st.just(""), queries),
    method=_methods,
    none_match=st.one_of(st.none(), _junk_header),
    since=st.one_of(st.none(), _junk_header),
    body=st.binary(max_size=200),
    length=st.one_of(st.none(), st.sampled_from(["", "abc", "-1", "0", "99999999999", "70000"])),
)
def test_whole_requests_get_well_formed_answers(
    app, path, query, method, none_match, since, body, length
):
    headers = {}
    if none_match is not None:
        headers["If-None-Match"] = none_match
    if since is not None:
        headers["If-Modified-Since"] = since
    environ = environ_for(query, path, method, headers, body, length)
    reply = answer(app, environ)
    check_well_formed(reply, method.upper())
    assert reply.status != 500, (path, query)


# --- regression tests: the minimal failing examples -----------------------------------------

BIG = "1" * 5000

FIXED = [
    # iiif.py: int() of 4300+ digits, float overflow in pct: regions and sizes (now a 4xx,
    # or a 200 where the huge width or height is cropped to the image)
    f"IIIF=rgb.tif/{BIG},0,10,10/max/0/default.jpg",
    f"IIIF=rgb.tif/0,0,{BIG},10/max/0/default.jpg",
    f"IIIF=rgb.tif/pct:{'9' * 400},0,10,10/max/0/default.jpg",
    f"IIIF=rgb.tif/pct:0,0,{'9' * 400},10/max/0/default.jpg",
    f"IIIF=rgb.tif/full/!{'9' * 400},{'9' * 400}/0/default.jpg",
    f"IIIF=rgb.tif/full/{'9' * 400},/0/default.jpg",
    "IIIF=rgb.tif/full/pct:" + "9" * 307 + "/0/default.jpg",
    f"DeepZoom=rgb.tif_files/9/{BIG}_0.jpg",
    f"DeepZoom=rgb.tif_files/9/0_{BIG}.jpg",
    f"Zoomify=rgb.tif/TileGroup0/{BIG}-0-0.jpg",
    f"Zoomify=rgb.tif/TileGroup0/0-{BIG}-0.jpg",
    f"Zoomify=rgb.tif/TileGroup0/0-0-{BIG}.jpg",
]

#: query → where the fix belongs (these still answer 500 "Internal server error").
#: Inputs that gave a 500 before commands.whole (saturated integers), the finite-ROT check and
#: the VisiOmatic parser's saturation; kept as regression tests.
SATURATED = {
    f"FIF=rgb.tif&JTL={BIG},0": "commands.atoi: int() of 4300+ digits",
    f"FIF=rgb.tif&JTL=0,{BIG}": "commands.atoi: int() of 4300+ digits",
    f"FIF=rgb.tif&WID={BIG}&CVT=jpeg": "commands.atoi: int() of 4300+ digits",
    f"FIF=rgb.tif&HEI={BIG}&CVT=jpeg": "commands.atoi: int() of 4300+ digits",
    f"FIF=rgb.tif&SDS={BIG}": "commands.atoi: int() of 4300+ digits",
    f"FIF=rgb.tif&SHD={BIG},1&JTL=0,0": "commands.atoi: int() of 4300+ digits",
    f"FIF=rgb.tif&QLT={BIG}&JTL=0,0": "commands.atoi: int() of 4300+ digits",
    f"FIF=rgb.tif&MINMAX={BIG}:0,1&JTL=0,0": "commands.atoi: int() of 4300+ digits",
    f"FIF=star.tif&CHAN=1&MINMAX={BIG}:0,1&JTL=0,0": "visiomatic.Request.parse: MINMAX int()",
    f"FIF=star.tif&CHAN=1&JTL={BIG},0": "visiomatic.Request.parse: JTL int()",
    f"FIF=star.tif&CHAN=1&VAL={BIG},0": "visiomatic.Request.parse: VAL int()",
    f"FIF=star.tif&PFL={BIG},0:1,1": "visiomatic.Request.parse: PFL int()",
    f"FIF=star.tif&RGN={BIG},0:1,1": "visiomatic.Request.parse: RGN int()",
    "FIF=rgb.tif&ROT=1e309&JTL=0,0": "commands ROT: inf reaches int() in iip.Session._tile",
    "FIF=rgb.tif&ROT=inf&JTL=0,0": "commands ROT: inf reaches int() in iip.Session._tile",
    "FIF=rgb.tif&ROT=nan&JTL=0,0": "commands ROT: nan reaches int() in iip.Session._tile",
}


@pytest.mark.parametrize("query", FIXED, ids=lambda q: q[:48])
def test_fixed_inputs_get_an_ordinary_answer(app, query):
    reply = answer(app, environ_for(query))
    check_well_formed(reply)
    assert reply.status < 500, reply.body[:200]
    if reply.status == 200:
        assert reply.header("Content-Type") == "image/jpeg"
    else:
        assert 400 <= reply.status < 500


@pytest.mark.parametrize("query", SATURATED, ids=lambda q: q[:48])
def test_huge_and_non_finite_numbers_get_an_ordinary_answer(app, query):
    reply = answer(app, environ_for(query))
    check_well_formed(reply)
    assert reply.status < 500, reply.body[:200]


def test_json_error_with_undecodable_path(app):
    reply = answer(app, environ_for("FIF=%c0%ae.tif&INFO"))
    check_well_formed(reply)
    assert reply.status == 404


def _patched_tiff(path: Path, tag: int, values: tuple[int, ...], fmt: str) -> Path:
    """A small tiled RGB TIFF whose tag ``tag`` holds ``values`` (patched in place)."""
    import struct

    import tifffile

    rgb = np.zeros((32, 32, 3), np.uint8)
    write_pyramid(path, [rgb], tile=(16, 16), photometric="rgb", resolution=(1, 1))
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].tags[tag].valueoffset
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<" + fmt, *values))
    return path


#: Mutated TIFFs found by fuzz/fuzz_tiff.py: (tag, values, struct format).
HOSTILE_TIFFS = {
    "bits-per-sample-8-8-16": (258, (8, 8, 16), "3H"),
    "x-resolution-1-over-0": (282, (1, 0), "2I"),
}


@pytest.mark.parametrize("case", HOSTILE_TIFFS)
def test_tiff_source_raises_only_our_errors(tmp_path, case):
    from iipserver.sources.tiff import TiffSource

    path = _patched_tiff(tmp_path / "bad.tif", *HOSTILE_TIFFS[case])
    with contextlib.suppress(IIPServerError):
        TiffSource(str(path)).close()


@pytest.mark.parametrize("case", HOSTILE_TIFFS)
def test_hostile_tiffs_get_well_formed_answers(tmp_path, case):
    _patched_tiff(tmp_path / "bad.tif", *HOSTILE_TIFFS[case])
    app = make_app(Settings.from_environ({"FILESYSTEM_PREFIX": f"{tmp_path}/"}))
    for query in ("FIF=bad.tif&OBJ=IIP,1.0&OBJ=Max-size", "FIF=bad.tif&JTL=0,0"):
        check_well_formed(answer(app, environ_for(query)))


#: fuzz/fuzz_tiff.py (-seed=1): a strip TIFF of 2621440×48 bilevel pixels with no strip
#: offsets. Before the hostile-file limits of sources/tiff.py, CVT and the VisiOmatic INFO
#: decoded the whole 15 MB level for ~10 s each; now refused at once.
SLOW_TIFF = (
    "SUkqAAgAAAAPAAABBAABAAAAMAAAAAEBBAABAAAAAAAoAEAAAgEDAAMAAADCAAAAAwEDAAEAAAAIAAAABgEDAAEA"
    "AAACAAAAFQEDAAEAAAADAAAAGgEFAAEAAADIAAAAGwEFAAEAAADQAAAAHAEDAAEAAAABAAAAKAGkAAEAAAABAAAA"
    "MQECAAwAAADYAAAAQgEEAAEAAAAQAAAAQwEEAAEAAAAQAAAARAEEAAkAAADkAAAARQEDAAkAAAAIAQAAAAAAAAgA"
    "CAAIAAEAAAABAAAAAQBJSSoACAAAAA8AAAEEAAEAAAAwAAAAAQEEAAEAAAAoAAAAAgEDAAMAAADCAAACAQMAAwAA"
    "AMIAAAADAQMAAQAAAAgAAAAGAQMAAQAAAAIAAAAVAQMAAQAAAAMAAAAaAQUAAQAAAMgAAAAbAQUAAQAAANAAAAAc"
    "AQMAAQAAAAEAAAAoAaQAAQAAAAEAAAAxAQIADAAQAAMBAwABAAAACAAAAAYBAwABAAAAAgAAAAABAAAAdGlmZmZp"
    "bGUuABUBAw=="
)


@pytest.mark.parametrize(
    "query",
    ["FIF=s.tif&WID=64&CVT=png", "FIF=s.tif&INFO", "FIF=s.tif&OBJ=Max-size", "FIF=s.tif&JTL=0,0"],
)
def test_fuzzed_huge_bilevel_strip_tiff_is_answered_quickly(tmp_path, query):
    import base64

    (tmp_path / "s.tif").write_bytes(base64.b64decode(SLOW_TIFF))
    app = make_app(Settings.from_environ({"FILESYSTEM_PREFIX": f"{tmp_path}/"}))
    check_well_formed(answer(app, environ_for(query)))
