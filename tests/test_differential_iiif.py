"""Differential tests of IIIF (Image API 2), DeepZoom and Zoomify: iipsrv 1.1 vs iipserver.

Spec = /work/shared/spec/iip-protocol.md §15-§16 and §22 cases 19-23, policy = policy.md,
decisions = docs/decisions.md ("IIIF, DeepZoom, Zoomify"). Both servers run with
``IIIF_VERSION=2`` (1.1 speaks IIIF 2 only and ignores the variable). Requests arrive over
FastCGI with REQUEST_URI ``/fcgi-bin/iipsrv.fcgi?<query>`` and Host ``localhost``.

Rules:

* ``info.json``: both parsed as JSON; ``@context``, ``@id``, ``protocol``, width, height and
  ``tiles`` equal; ``sizes`` compared as sets: 1.1's ⊆ ours, and ours = every level but the
  full one (decisions: no MAX_CVT filter; 1.1 lists the smallest level first and drops levels
  ≥ MAX_CVT); profile: ours is level 2 where 1.1 says level 1, and ours lists a superset of
  1.1's formats, qualities (1.1's IIIF-1 name ``native`` is IIIF 2's ``default``) and
  supports; maxWidth/maxHeight equal. Content-Type equal when the client accepts
  ``application/ld+json`` (IIIF 2.1 §5: plain ``application/json`` otherwise, decisions).
* 303 for a bare identifier: same status and Location.
* Image requests: same status; the same output size as 1.1 whenever 1.1's size is a IIIF 2.1
  answer (``w,``: width w and a height that is the floor or ceiling of the exact aspect-kept
  value, and so on: ``iiif_allows``). Where 1.1's CVT re-rounds the size from level pixels and
  breaks that (``,100`` → 133×99, ``138,`` → 137 wide), ours must give a IIIF answer instead
  (the issue asks for IIIF conformance). Where the sizes agree,
  decoded pixels within the ``TOL_*`` of test_differential_science (TOL_PLAIN for 8-bit
  sources, TOL_FLOAT for float/16-bit, TOL_BINARY for ``bitonal``). Upscaled outputs are
  compared without their last rows (1.1's bilinear resize reads past its buffer there, spec
  §12.2, notes §2.3). Image headers: Content-Type, Last-Modified and Cache-Control values
  equal (1.1 sends CVT-style or JTL-style headers depending on its path; ours follows the
  decisions' tile-path rule and adds the profile Link header).
* Viewer tile grids: every tile an IIIF 2 viewer (OpenSeadragon's request pattern: region of
  ``tile × scaleFactor`` pixels cropped to the image, ``full`` for the whole image, size
  ``ceil(region width / scaleFactor),``) asks for, at every scale factor.
* Errors that 1.1 answers without crashing: same status; 404 texts equal once
  ``FILESYSTEM_PREFIX`` is removed from 1.1's. Departures sanctioned by the decisions or the
  IIIF issue (exact IIIF statuses: 400 bad syntax, 404 unknown image, 501 unsupported; PNG and
  WebP output) are checked in their own form (``DEPARTURES``).
* DeepZoom ``.dzi`` and Zoomify ``ImageProperties.xml`` bodies byte for byte, headers as in
  test_differential; every tile of every level (DeepZoom levels below the pyramid included,
  and one level above it) with the same size and pixels.

Never sent to 1.1 (spec §5.7, notes): malformed regions such as ``full,32912,500,500``, regions
starting outside the image, sizes above MAX_CVT or huge upscales, ``bitonal`` on tile-aligned
requests (1.1's JTL path returns garbage for RGB and hangs on grey.tif: it is compared with
1.1's CVT path instead).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from fractions import Fraction
from urllib.parse import unquote

import fcgi_client
import imagecodecs
import numpy as np
import pytest
import simplejpeg
from conftest import ImageSet, ServerPair, ServerPairs, _our_process, _reference_process
from fcgi_client import Response
from reference import (
    array_problems,
    compare_headers,
    decode,
    jpeg_info,
    jpeg_structure_problems,
    policy_problems,
)
from test_differential_science import TOL_BINARY, TOL_FLOAT, TOL_PLAIN

pytestmark = pytest.mark.reference

Tol = tuple[int, float | None]

#: The Accept header of a client asking for JSON-LD (IIIF 2.1 §5).
LD = {"Accept": "application/ld+json"}
IIIF2_CONTEXT = "http://iiif.io/api/image/2/context.json"
BASE = "http://localhost/fcgi-bin/iipsrv.fcgi?IIIF="

#: Images whose pixels are 8-bit (TOL_PLAIN); the others are float or 16-bit (TOL_FLOAT).
EIGHT_BIT = {"rgb.tif", "rgb_raw.tif", "grey.tif", "deflate.tif", "meta.tif", "odd.tif"}
EIGHT_BIT |= {"single.tif", "deep.tif"}


@pytest.fixture(scope="module")
def iiif(server_pair: ServerPairs) -> ServerPair:
    """(iipsrv 1.1, ours) with IIIF_VERSION=2."""
    return server_pair(IIIF_VERSION="2")


# ----------------------------------------------------------------------------------------
# Helpers


def _show(resp: Response, limit: int = 300) -> str:
    raw = resp.raw
    for magic in (b"\xff\xd8", b"\x89PNG", b"RIFF"):
        if magic in raw[:2000]:
            head, _, _ = raw.partition(magic)
            return repr(head) + f" + image ({len(resp.body)} body bytes)"
    return repr(raw[:limit]) + ("…" if len(raw) > limit else "")


def _fail(query: str, ref: Response | None, ours: Response, problems: Sequence[str]) -> None:
    if problems:
        theirs = _show(ref) if ref is not None else "(not sent)"
        pytest.fail(
            "; ".join(problems)
            + f"\n  query:  {query!r}\n  iipsrv: {theirs}\n  ours:   {_show(ours)}",
            pytrace=False,
        )


def _prefix(images: ImageSet) -> str:
    return f"{images.root}/"


def _status(ref: Response, ours: Response) -> list[str]:
    return [] if ref.status == ours.status else [f"status: iipsrv {ref.status}, ours {ours.status}"]


def _common(ref: Response, ours: Response, images: ImageSet) -> list[str]:
    problems = _status(ref, ours) + policy_problems(ours)
    if _prefix(images).encode() in ours.raw:
        problems.append("ours reveals FILESYSTEM_PREFIX")
    return problems


def _same_values(ref: Response, ours: Response, names: Sequence[str]) -> list[str]:
    out = []
    for name in names:
        if ref.header(name) != ours.header(name):
            out.append(f"{name}: iipsrv {ref.header(name)!r}, ours {ours.header(name)!r}")
    return out


def _is_jpeg(resp: Response) -> bool:
    return resp.status == 200 and resp.body.startswith(b"\xff\xd8")


def _size(resp: Response) -> tuple[int, int]:
    info = jpeg_info(resp.body)
    return info.width, info.height


def jpeg_problems(ref: Response, ours: Response, tol: Tol, rows: int | None = None) -> list[str]:
    if not _is_jpeg(ours):
        return [f"ours is not a JPEG (Content-Type {ours.header('Content-Type')!r})"]
    problems = jpeg_structure_problems(ref.body, ours.body)
    return problems or array_problems(decode(ref.body), decode(ours.body), tol, rows)


def _tol(name: str) -> Tol:
    return TOL_PLAIN if name in EIGHT_BIT else TOL_FLOAT


def _levels(images: ImageSet, name: str) -> list[tuple[int, int]]:
    """(width, height) of every level, largest first."""
    return [(lv.shape[1], lv.shape[0]) for lv in images[name].levels]


# ----------------------------------------------------------------------------------------
# Output sizes: IIIF's rule, and 1.1's region arithmetic (IIIF.cc@1.1 with View.cc@1.1)

_f32 = np.float32


def _cround(x: float | np.floating) -> int:
    """C ``round`` for non-negative values (halves away from zero)."""
    return math.floor(float(x) + 0.5)


def _view(region: str, width: int, height: int) -> tuple[np.float32, ...]:
    """View left, top, width, height fractions after IIIF region parsing and View's setters."""
    vl, vt, vw, vh = _f32(0), _f32(0), _f32(1), _f32(1)
    if region == "full":
        return vl, vt, vw, vh
    if region == "square":
        if height > width:
            r3 = _f32(_f32(width) / _f32(height))
            return vl, _f32((1.0 - float(r3)) / 2.0), vw, r3
        if width > height:
            r2 = _f32(_f32(height) / _f32(width))
            left = _f32((1.0 - float(r2)) / 2.0)
            if float(_f32(left + r2)) > 1.0:
                r2 = _f32(1.0 - float(left))
            return left, vt, r2, vh
        return vl, vt, vw, vh
    pct = region.startswith("pct:")
    values = [_f32(float(v)) for v in region.removeprefix("pct:").split(",")]
    wd, hd = (_f32(100), _f32(100)) if pct else (_f32(width), _f32(height))
    x, y, w, h = values[0] / wd, values[1] / hd, values[2] / wd, values[3] / hd
    vl = _f32(min(max(float(x), 0.0), 1.0))
    vt = _f32(min(max(float(y), 0.0), 1.0))
    if float(_f32(vl + w)) > 1.0:
        w = _f32(1.0 - float(vl))
    vw = _f32(min(max(float(w), 0.0), 1.0))
    vh = _f32(min(max(float(h), 0.0), 1.0))
    return vl, vt, vw, vh


def _view_px(full: int, frac: np.float32, start: np.float32) -> int:
    """View::getViewWidth/Height at full resolution."""
    size = _cround(_f32(frac * _f32(full)))
    left = _cround(_f32(start * _f32(full)))
    if size + left > full:
        size = full - left
    return max(size, 1)


def region_px(region: str, width: int, height: int) -> tuple[int, int]:
    """Width and height of a IIIF region in full-resolution pixels, cropped to the image, as
    1.1 computes them (for pixel regions: the IIIF crop)."""
    vl, vt, vw, vh = _view(region, width, height)
    return _view_px(width, vw, vl), _view_px(height, vh, vt)


def _quarter_turn(rotation: str) -> bool:
    return float(rotation.lstrip("!")) % 180 == 90


def _near(x: Fraction) -> set[int]:
    return {max(1, math.floor(x)), max(1, math.ceil(x))}


def iiif_allows(rw: int, rh: int, size: str, out: tuple[int, int]) -> bool:
    """Whether ``out`` (before rotation) is a IIIF 2.1 answer to ``size`` for a ``rw``×``rh``
    region: the given dimensions exact, a derived one the floor or ceiling of the exact ratio."""
    w, h = out
    if size in ("full", "max"):
        return out == (rw, rh)
    if size.startswith("pct:"):
        n = Fraction(size[4:]) / 100
        return w in _near(rw * n) and h in _near(rh * n)
    if size.startswith("!"):
        bw, bh = (int(v) for v in size[1:].split(","))
        by_w = w == bw and h in _near(Fraction(rh * bw, rw))
        by_h = h == bh and w in _near(Fraction(rw * bh, rh))
        return w <= bw and h <= bh and (by_w or by_h)
    if size.startswith(","):
        return h == int(size[1:]) and w in _near(Fraction(rw * h, rh))
    if size.endswith(","):
        return w == int(size[:-1]) and h in _near(Fraction(rh * w, rw))
    return out == tuple(int(v) for v in size.split(","))


def size_problems(query: str, width: int, height: int, theirs, mine) -> list[str]:
    """Ours must have 1.1's size when 1.1's is a IIIF answer, else a IIIF answer."""
    region, size, rotation, _ = unquote(query).split("/")[-4:]
    rw, rh = region_px(region, width, height)
    turn = _quarter_turn(rotation)
    ok_theirs = iiif_allows(rw, rh, size, theirs[::-1] if turn else theirs)
    if ok_theirs and mine != theirs:
        return [f"size: iipsrv {theirs[0]}x{theirs[1]}, ours {mine[0]}x{mine[1]}"]
    if not ok_theirs and not iiif_allows(rw, rh, size, mine[::-1] if turn else mine):
        return [
            f"size: ours {mine[0]}x{mine[1]} is not a IIIF answer for {size!r} on a {rw}x{rh} "
            f"region (iipsrv {theirs[0]}x{theirs[1]}, not one either)"
        ]
    return []


def _oob_rows(out_h: int, src_h: int) -> int:
    """Rows of an upscaled output that do not depend on 1.1's reads past its buffer (the last
    ``2·ceil(H'/h)`` rows, plus the 16-row JPEG MCU and one row of fancy upsampling)."""
    return max(0, out_h - 2 * math.ceil(out_h / src_h) - 17)


def check_image(
    query: str,
    ref: Response,
    ours: Response,
    images: ImageSet,
    name: str,
    tol: Tol,
    *,
    ref_query: str | None = None,
) -> None:
    """One IIIF image request (``ref_query``: what 1.1 was sent, if not ``query``)."""
    problems = _common(ref, ours, images)
    if not problems and ref.status == 200:
        assert _is_jpeg(ref), f"{ref_query or query}: iipsrv did not answer a JPEG: {_show(ref)}"
        problems += _same_values(ref, ours, ("Content-Type", "Last-Modified", "Cache-Control"))
        if not _is_jpeg(ours):
            problems.append(f"ours is not a JPEG ({ours.header('Content-Type')!r})")
        else:
            width, height = _levels(images, name)[0]
            theirs, mine = _size(ref), _size(ours)
            problems += size_problems(query, width, height, theirs, mine)
            if theirs == mine:
                region, _, rotation, _ = unquote(query).split("/")[-4:]
                rw, rh = region_px(region, width, height)
                out_w, out_h = mine[::-1] if _quarter_turn(rotation) else mine
                rows = None
                if out_w > rw or out_h > rh:
                    assert not _quarter_turn(rotation), "harness: no rotated upscaled cases"
                    rows = _oob_rows(out_h, rh)
                problems += jpeg_problems(ref, ours, tol, rows)
    _fail(query if ref_query is None else f"{query} (iipsrv: {ref_query})", ref, ours, problems)


# ----------------------------------------------------------------------------------------
# info.json, @id and the 303 redirect (§22 cases 19-20)

INFO_IMAGES = [
    "rgb.tif",
    "grey.tif",
    "f2.tif",
    "star.tif",
    "grey16.tif",
    "cube.tif",
    "deflate.tif",
    "meta.tif",  # a single level, 200x150
    "odd.tif",
    "single.tif",
    "deep.tif",
]


def _sizes(info: dict) -> set[tuple[int, int]]:
    return {(s["width"], s["height"]) for s in info["sizes"]}


def info_problems(a: dict, b: dict, levels: list[tuple[int, int]]) -> list[str]:
    """1.1's info.json ``a`` against ours ``b``: everything but the profile."""
    problems = []
    for key in ("@context", "@id", "protocol", "width", "height", "tiles"):
        if a.get(key) != b.get(key):
            problems.append(f"{key}: iipsrv {a.get(key)!r}, ours {b.get(key)!r}")
    theirs, mine = _sizes(a), _sizes(b)
    want = set(levels[1:]) or {levels[0]}
    if not theirs <= mine:
        problems.append(f"sizes: iipsrv lists {sorted(theirs - mine)} that ours lacks")
    if mine != want:
        problems.append(f"sizes: ours {sorted(mine)}, expected every level but the full one {want}")
    ra, rb = a["profile"][1], b["profile"][1]
    for key in ("maxWidth", "maxHeight"):
        if ra.get(key) != rb.get(key):
            problems.append(f"{key}: iipsrv {ra.get(key)!r}, ours {rb.get(key)!r}")
    return problems


def profile_problems(a: dict, b: dict) -> list[str]:
    """Ours is level 2 and lists a superset of 1.1's formats, qualities and supports."""
    problems = []
    assert a["profile"][0] == "http://iiif.io/api/image/2/level1.json", a["profile"]
    if b["profile"][0] != "http://iiif.io/api/image/2/level2.json":
        problems.append(f"profile: ours {b['profile'][0]!r}, expected level2 (decisions)")
    ra, rb = a["profile"][1], b["profile"][1]
    renamed = {"native": "default"}  # IIIF 1 → IIIF 2
    for key, rename in (("formats", {}), ("qualities", renamed), ("supports", {})):
        missing = {rename.get(v, v) for v in ra[key]} - set(rb.get(key, []))
        if missing:
            problems.append(f"profile {key}: ours lacks {sorted(missing)} (ours {rb.get(key)})")
    return problems


def _compare_info(query: str, ref: Response, ours: Response, images: ImageSet, name: str) -> None:
    problems = _common(ref, ours, images)
    if not problems:
        problems += _same_values(ref, ours, ("Content-Type", "Last-Modified", "Cache-Control"))
        try:
            mine = json.loads(ours.body)
        except ValueError as exc:
            problems.append(f"ours is not JSON: {exc}")
        else:
            problems += info_problems(json.loads(ref.body), mine, _levels(images, name))
    _fail(query, ref, ours, problems)


@pytest.mark.parametrize("name", INFO_IMAGES)
def test_info_json(iiif: ServerPair, images: ImageSet, name: str) -> None:
    """Case 19 on every image (client accepting JSON-LD, as 1.1 always answers JSON-LD)."""
    ref_server, our_server = iiif
    query = f"IIIF={name}/info.json"
    ref, ours = ref_server.get(query, LD), our_server.get(query, LD)
    theirs = json.loads(ref.body)
    assert theirs["@id"] == BASE + name and theirs["@context"] == IIIF2_CONTEXT  # case 19
    _compare_info(query, ref, ours, images, name)


@pytest.mark.parametrize("name", INFO_IMAGES)
def test_info_json_profile(iiif: ServerPair, name: str) -> None:
    """The profile: level 2 and a superset of 1.1's level-1 description."""
    query = f"IIIF={name}/info.json"
    ref, ours = iiif[0].get(query, LD), iiif[1].get(query, LD)
    assert ours.status == 200, _show(ours)
    _fail(query, ref, ours, profile_problems(json.loads(ref.body), json.loads(ours.body)))


def test_info_json_media_type_without_accept(iiif: ServerPair) -> None:
    """Decisions (IIIF 2.1 §5): plain JSON unless the client accepts JSON-LD; 1.1 always sends
    application/ld+json."""
    query = "IIIF=rgb.tif/info.json"
    ref, ours = iiif[0].get(query), iiif[1].get(query)
    assert ref.header("Content-Type") == "application/ld+json"
    problems = [] if ours.status == 200 else [f"status {ours.status}"]
    if ours.header("Content-Type") != "application/json":
        problems.append(f"Content-Type {ours.header('Content-Type')!r}, expected application/json")
    _fail(query, ref, ours, problems)


def test_info_json_max_cvt(server_pair: ServerPairs, images: ImageSet) -> None:
    """MAX_CVT=300: 1.1 drops the 500x375 size; ours lists every level (decisions), both
    advertise maxWidth/maxHeight 300."""
    ref_server, our_server = server_pair(IIIF_VERSION="2", MAX_CVT="300")
    for name in ("rgb.tif", "odd.tif", "grey16.tif"):
        query = f"IIIF={name}/info.json"
        ref, ours = ref_server.get(query, LD), our_server.get(query, LD)
        theirs = json.loads(ref.body)
        assert theirs["profile"][1]["maxWidth"] == 300
        assert name != "rgb.tif" or _sizes(theirs) == {(250, 187)}  # 500x375 filtered out
        _compare_info(query, ref, ours, images, name)


@pytest.mark.parametrize(
    "query",
    [
        "IIIF=rgb.tif/info.json",
        "IIIF=single.tif/info.json",
        "IIIF=rgb%2Etif/info.json",  # URL-encoded identifier: 1.1 decodes the @id
    ],
)
def test_info_id_https(iiif: ServerPair, query: str) -> None:
    """With the FastCGI parameter HTTPS=on (nginx behind TLS) the @id is https://."""
    ids = []
    for server in iiif:
        params = [*fcgi_client.cgi_params(query, headers=LD), ("HTTPS", "on")]
        raw = fcgi_client.request(server.address, params, timeout=30)
        status, _, _, body = fcgi_client.parse_cgi(raw.stdout)
        assert status == 200, (server.name, status, body[:200])
        ids.append(json.loads(body)["@id"])
    name = query.split("=", 1)[1].rsplit("/", 1)[0].replace("%2E", ".")
    assert ids[0] == "https://localhost/fcgi-bin/iipsrv.fcgi?IIIF=" + name
    assert ids[1] == ids[0], f"@id: iipsrv {ids[0]!r}, ours {ids[1]!r}"


def test_info_id_x_iiif_id(iiif: ServerPair) -> None:
    """Spec §15: an X-IIIF-ID request header overrides the @id."""
    query = "IIIF=rgb.tif/info.json"
    headers = {**LD, "X-IIIF-ID": "https://iiif.example.org/iiif/2/rgb"}
    ref, ours = iiif[0].get(query, headers), iiif[1].get(query, headers)
    theirs = json.loads(ref.body)["@id"]
    assert theirs == "https://iiif.example.org/iiif/2/rgb"
    mine = json.loads(ours.body)["@id"] if ours.status == 200 else f"(status {ours.status})"
    _fail(query, ref, ours, [] if mine == theirs else [f"@id: iipsrv {theirs!r}, ours {mine!r}"])


@pytest.mark.parametrize("name", ["rgb.tif", "odd.tif", "single.tif"])
def test_redirect(iiif: ServerPair, images: ImageSet, name: str) -> None:
    """Case 20: a bare identifier is redirected (303) to its info.json. (Not with ``%``
    escapes: 1.1 prints the raw REQUEST_URI as a printf format, spec §5.6.)"""
    query = f"IIIF={name}"
    ref, ours = iiif[0].get(query), iiif[1].get(query)
    assert ref.status == 303, _show(ref)
    problems = _common(ref, ours, images) + _same_values(ref, ours, ("Location",))
    _fail(query, ref, ours, problems)


BASE_URL = "https://iiif.example.org/i/"


@pytest.fixture(scope="module")
def base_url_pair(
    images: ImageSet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerPair]:
    """(iipsrv 1.1, ours) with BASE_URL set (a URL is no directory label for ``server_pair``)."""
    settings = {"IIIF_VERSION": "2", "BASE_URL": BASE_URL}
    ref = _reference_process(images, tmp_path_factory.mktemp("iipsrv-base-url"), **settings)
    mine = _our_process(images, tmp_path_factory.mktemp("iipserver-base-url"), **settings)
    ref.start()
    try:
        mine.start()
    except BaseException:
        ref.stop()
        raise
    yield ref, mine
    ref.stop()
    mine.stop()


def test_base_url(base_url_pair: ServerPair, images: ImageSet) -> None:
    """BASE_URL: @id = BASE_URL + identifier, and the redirect goes there."""
    ref_server, our_server = base_url_pair
    query = "IIIF=odd.tif/info.json"
    ref, ours = ref_server.get(query, LD), our_server.get(query, LD)
    assert json.loads(ref.body)["@id"] == BASE_URL + "odd.tif"
    _compare_info(query, ref, ours, images, "odd.tif")
    query = "IIIF=odd.tif"
    ref, ours = ref_server.get(query), our_server.get(query)
    assert ref.header("Location") == BASE_URL + "odd.tif/info.json"
    _fail(query, ref, ours, _common(ref, ours, images) + _same_values(ref, ours, ("Location",)))


# ----------------------------------------------------------------------------------------
# Image requests


def _q(name: str, params: str, id_: str, tol: Tol | None = None):
    return pytest.param(name, params, tol, id=id_)


IMAGE_REQUESTS = [
    # §22 case 21: tile-aligned (JTL in 1.1) and the same region as w,h (CVT in 1.1).
    _q("rgb.tif", "0,0,512,512/256,/0/default.jpg", "case21-tile"),
    _q("rgb.tif", "0,0,512,512/256,256/0/default.jpg", "case21-tile-wh"),
    _q("rgb.tif", "768,0,232,256/232,/0/default.jpg", "edge-tile-cvt-in-1.1"),
    _q("rgb.tif", "768,512,232,238/232,/0/default.jpg", "corner-tile"),
    _q("rgb.tif", "256,256,256,256/128,/0/default.jpg", "tile-downscaled"),
    _q("rgb.tif", "0,0,1024,1024/256,/0/default.jpg", "region-past-edges"),
    # Sizes.
    _q("rgb.tif", "full/full/0/default.jpg", "full-full"),
    _q("rgb.tif", "full/max/0/default.jpg", "full-max"),
    _q("rgb.tif", "0,0,1000,750/full/0/default.jpg", "whole-region-px"),
    _q("rgb.tif", "full/200,/0/default.jpg", "w"),
    _q("rgb.tif", "full/500,/0/default.jpg", "w-level1"),
    _q("rgb.tif", "full/,375/0/default.jpg", "h-level1"),
    _q("rgb.tif", "full/,100/0/default.jpg", "h"),
    _q("rgb.tif", "full/,187/0/default.jpg", "h-187"),
    _q("rgb.tif", "full/250,/0/default.jpg", "w-smallest-level"),
    _q("rgb.tif", "full/250,187/0/default.jpg", "wh-smallest-level"),
    _q("rgb.tif", "full/200,100/0/default.jpg", "wh-distorted"),
    _q("rgb.tif", "full/100,200/0/default.jpg", "wh-distorted-tall"),
    _q("rgb.tif", "full/!200,100/0/default.jpg", "confined"),
    _q("rgb.tif", "full/pct:25/0/default.jpg", "pct-25"),
    _q("rgb.tif", "full/pct:33/0/default.jpg", "pct-33"),
    _q("rgb.tif", "full/pct:50/0/default.jpg", "pct-50"),
    _q("rgb.tif", "full/200%2C/0/default.jpg", "encoded-comma"),
    _q("rgb%2Etif", "full/200,/0/default.jpg", "encoded-identifier"),
    # Regions.
    _q("rgb.tif", "square/200,/0/default.jpg", "square"),
    _q("rgb.tif", "square/full/0/default.jpg", "square-full"),
    _q("rgb.tif", "100,50,400,300/200,/0/default.jpg", "px"),
    _q("rgb.tif", "100,50,400,300/full/0/default.jpg", "px-full"),
    _q("rgb.tif", "100,100,50,50/full/0/default.jpg", "px-small"),
    _q("rgb.tif", "123,456,333,222/100,/0/default.jpg", "px-odd"),
    _q("rgb.tif", "pct:10,20,30,40/150,/0/default.jpg", "pct-region"),
    _q("rgb.tif", "pct:10,20,30,40/full/0/default.jpg", "pct-region-full"),
    _q("rgb.tif", "900,0,200,100/50,/0/default.jpg", "px-past-right"),
    _q("rgb.tif", "900,700,200,100/50,/0/default.jpg", "px-past-corner"),
    # Rotations and mirroring.
    _q("rgb.tif", "full/200,/90/default.jpg", "rot90"),
    _q("rgb.tif", "full/200,/180/default.jpg", "rot180"),
    _q("rgb.tif", "full/200,/270/default.jpg", "rot270"),
    _q("rgb.tif", "full/200,/360/default.jpg", "rot360"),
    _q("rgb.tif", "full/200,/90.0/default.jpg", "rot90-decimal"),
    _q("rgb.tif", "full/200,/!0/default.jpg", "mirror"),
    _q("rgb.tif", "full/200,/!90/default.jpg", "mirror-rot90"),
    _q("rgb.tif", "full/200,/!180/default.jpg", "mirror-rot180"),
    _q("rgb.tif", "full/200,/!270/default.jpg", "mirror-rot270"),
    _q("rgb.tif", "0,0,512,512/256,/90/default.jpg", "tile-rot90"),
    _q("rgb.tif", "0,0,512,512/256,/!0/default.jpg", "tile-mirror"),
    # Qualities (1.1: native, color, default, grey, gray, bitonal).
    _q("rgb.tif", "full/200,/0/native.jpg", "native"),
    _q("rgb.tif", "full/200,/0/color.jpg", "color"),
    _q("rgb.tif", "full/200,/0/gray.jpg", "gray"),
    _q("rgb.tif", "full/200,/0/grey.jpg", "grey"),
    _q("rgb.tif", "0,0,512,512/256,/0/gray.jpg", "tile-gray"),
    _q("rgb.tif", "full/200,/0/bitonal.jpg", "bitonal", TOL_BINARY),
    _q("rgb_raw.tif", "full/300,/0/bitonal.jpg", "raw-bitonal", TOL_BINARY),
    _q("grey.tif", "full/300,/0/bitonal.jpg", "grey-bitonal", TOL_BINARY),
    _q("grey.tif", "full/300,/0/gray.jpg", "grey-gray"),
    # Upscaling (sizeAboveFull): compared without the rows 1.1 reads out of bounds.
    _q("rgb.tif", "full/1500,/0/default.jpg", "up-w"),
    _q("rgb.tif", "full/pct:150/0/default.jpg", "up-pct"),
    _q("rgb.tif", "full/!2000,2000/0/default.jpg", "up-confined"),
    _q("meta.tif", "full/300,/0/default.jpg", "up-single-level"),
    # Other images: float, 16-bit, multi-band, deflate, single level, odd sizes.
    _q("star.tif", "full/200,/0/default.jpg", "star-w"),
    _q("star.tif", "full/full/0/default.jpg", "star-full"),
    _q("star.tif", "256,256,256,128/256,/0/default.jpg", "star-edge-tile"),
    _q("star.tif", "full/full/0/gray.jpg", "star-gray"),
    _q("star.tif", "full/200,/0/bitonal.jpg", "star-bitonal", TOL_BINARY),
    _q("star.tif", "100,50,300,200/150,/180/default.jpg", "star-region-rot180"),
    _q("f2.tif", "full/300,/0/default.jpg", "f2-w"),
    _q("f2.tif", "0,0,512,512/256,/0/default.jpg", "f2-tile"),
    _q("grey16.tif", "full/300,/90/default.jpg", "u16-rot90"),
    _q("grey16.tif", "0,0,512,400/256,/0/default.jpg", "u16-edge-tile"),
    _q("cube.tif", "full/200,/0/default.jpg", "cube-w"),
    _q("cube.tif", "full/200,/0/gray.jpg", "cube-gray-stays-colour"),
    _q("deflate.tif", "full/160,/0/default.jpg", "deflate-w"),
    _q("deflate.tif", "square/100,/0/default.jpg", "deflate-square"),
    _q("meta.tif", "full/full/0/default.jpg", "single-level-full"),
    _q("meta.tif", "full/max/0/default.jpg", "single-level-max"),
    _q("meta.tif", "full/100,/0/default.jpg", "single-level-w"),
    _q("meta.tif", "square/full/0/default.jpg", "single-level-square"),
    _q("meta.tif", "10,10,100,100/50,/0/default.jpg", "single-level-px"),
    _q("single.tif", "full/full/0/default.jpg", "single-full"),
    _q("single.tif", "full/100,/0/default.jpg", "single-w"),
    _q("single.tif", "square/,80/90/default.jpg", "single-square-rot90"),
    _q("odd.tif", "full/full/0/default.jpg", "odd-full"),
    _q("odd.tif", "square/full/0/default.jpg", "odd-square-portrait"),
    _q("odd.tif", "square/200,/0/default.jpg", "odd-square-w"),
    _q("odd.tif", "full/138,/0/default.jpg", "odd-w-138"),
    _q("odd.tif", "full/277,/0/default.jpg", "odd-w-level1"),
    _q("odd.tif", "full/,194/0/default.jpg", "odd-h-194"),
    _q("odd.tif", "full/!100,100/0/default.jpg", "odd-confined"),
    _q("odd.tif", "0,0,555,777/pct:50/0/default.jpg", "odd-pct-50"),
    _q("odd.tif", "pct:50,50,50,50/full/0/default.jpg", "odd-pct-region-full"),
    _q("odd.tif", "pct:5,5,50,50/100,/0/default.jpg", "odd-pct-region-w"),
    _q("odd.tif", "50,60,300,400/150,/270/default.jpg", "odd-px-rot270"),
    _q("odd.tif", "50,60,300,400/150,200/!90/default.jpg", "odd-px-wh-mirror-rot90"),
    _q("odd.tif", "512,768,43,9/43,/0/default.jpg", "odd-corner-sliver"),
    _q("deep.tif", "full/150,/0/default.jpg", "deep-w-level2"),
    _q("deep.tif", "full/37,/0/default.jpg", "deep-w-smallest"),
    _q("deep.tif", "20,10,200,150/50,/0/default.jpg", "deep-px-w"),
]


@pytest.mark.parametrize(("name", "params", "tol"), IMAGE_REQUESTS)
def test_image_request(
    iiif: ServerPair, images: ImageSet, name: str, params: str, tol: Tol | None
) -> None:
    query = f"IIIF={name}/{params}"
    ref, ours = iiif[0].get(query), iiif[1].get(query)
    check_image(query, ref, ours, images, name.replace("%2E", "."), tol or _tol(name))


def viewer_tiles(width: int, height: int, levels: int, tile: int = 256) -> dict[int, list[str]]:
    """Region/size/rotation/quality of every tile an IIIF 2 viewer requests, per scale factor."""
    out: dict[int, list[str]] = {}
    for i in range(levels):
        sf = 1 << i
        span = tile * sf
        requests = []
        for y in range(0, height, span):
            for x in range(0, width, span):
                w, h = min(span, width - x), min(span, height - y)
                region = "full" if (w, h) == (width, height) else f"{x},{y},{w},{h}"
                requests.append(f"{region}/{math.ceil(w / sf)},/0/default.jpg")
        out[sf] = requests
    return out


VIEWER_GRIDS = [
    (name, sf)
    for name, size, n in (
        ("rgb.tif", (1000, 750), 3),
        ("odd.tif", (555, 777), 3),
        ("star.tif", (512, 384), 2),
        ("grey16.tif", (600, 400), 3),
        ("deep.tif", (300, 200), 4),
        ("single.tif", (231, 173), 1),
        ("meta.tif", (200, 150), 1),
    )
    for sf in viewer_tiles(*size, n)
]


@pytest.mark.parametrize(("name", "sf"), VIEWER_GRIDS, ids=[f"{n}-sf{s}" for n, s in VIEWER_GRIDS])
def test_viewer_tile_grid(iiif: ServerPair, images: ImageSet, name: str, sf: int) -> None:
    """Every tile of one scale factor, as OpenSeadragon asks for them."""
    levels = _levels(images, name)
    width, height = levels[0]
    problems = []
    for params in viewer_tiles(width, height, len(levels))[sf]:
        query = f"IIIF={name}/{params}"
        ref, ours = iiif[0].get(query), iiif[1].get(query)
        try:
            check_image(query, ref, ours, images, name, _tol(name))
        except pytest.fail.Exception as exc:
            problems.append(str(exc))
    if problems:
        pytest.fail(f"{len(problems)} tile(s) differ:\n" + "\n".join(problems), pytrace=False)


@pytest.mark.parametrize(
    ("name", "region", "width", "height"),
    [
        ("rgb.tif", "0,0,512,512", 256, 256),
        ("rgb_raw.tif", "512,0,488,512", 244, 256),
        ("grey.tif", "0,0,512,512", 256, 256),
        ("grey.tif", "768,512,232,238", 232, 238),
        ("odd.tif", "0,0,256,256", 256, 256),
    ],
)
def test_bitonal_tile(
    iiif: ServerPair, images: ImageSet, name: str, region: str, width: int, height: int
) -> None:
    """``bitonal`` on a tile-aligned request: 1.1's JTL path is broken there (garbage on RGB,
    a hang on grey.tif), so ours is compared with 1.1's CVT path for the same pixels
    (``w,h`` keeps 1.1 off JTL; policy §2: real binarisation)."""
    query = f"IIIF={name}/{region}/{width},/0/bitonal.jpg"
    ref_query = f"IIIF={name}/{region}/{width},{height}/0/bitonal.jpg"
    ref, ours = iiif[0].get(ref_query), iiif[1].get(query)
    check_image(query, ref, ours, images, name, TOL_BINARY, ref_query=ref_query)


# ----------------------------------------------------------------------------------------
# Errors and departures

ERRORS = [
    "IIIF=rgb.tif/1,2,3/full/0/default.jpg",
    "IIIF=rgb.tif/1,2,3,4,5/full/0/default.jpg",
    "IIIF=rgb.tif/abc/full/0/default.jpg",
    "IIIF=rgb.tif/0,0,0,10/full/0/default.jpg",
    "IIIF=rgb.tif/pct:0,0,0,50/full/0/default.jpg",
    "IIIF=rgb.tif/pct:10,10,10/full/0/default.jpg",
    "IIIF=rgb.tif/full/0,/0/default.jpg",
    "IIIF=rgb.tif/full/,0/0/default.jpg",
    "IIIF=rgb.tif/full/pct:0/0/default.jpg",
    "IIIF=rgb.tif/full/!0,100/0/default.jpg",
    "IIIF=rgb.tif/full/abc/0/default.jpg",
    "IIIF=rgb.tif/full/200/0/default.jpg",
    "IIIF=rgb.tif/full/pct:abc/0/default.jpg",
    "IIIF=rgb.tif/full/full/x/default.jpg",
    "IIIF=rgb.tif/full/full//default.jpg",
    "IIIF=rgb.tif/full/200,/-90/default.jpg",
    "IIIF=rgb.tif/full/200,/450/default.jpg",
    "IIIF=rgb.tif/full/full/0/foo.jpg",
    "IIIF=rgb.tif/full/0",  # case 21: too few parameters
    "IIIF=rgb.tif/full/full/0/",
    "IIIF=nonexist.tif/full/full/0/default.jpg",
    "IIIF=nonexist.tif/info.json",
    "IIIF=rgb.tif/full/full/0/default.jpg/extra",  # identifier rgb.tif/full: 404
    "DeepZoom=nonexist.tif.dzi",
    "DeepZoom=nonexist.tif_files/0/0_0.jpg",
    "DeepZoom=rgb.tif_files/10/0_3.jpg",  # tile 12 of 12
    "Zoomify=nonexist.tif/ImageProperties.xml",
    "Zoomify=rgb.tif/TileGroup0/2-0-3.jpg",
    "Zoomify=rgb.tif/TileGroup0/3-0-0.jpg",  # r = number of levels
    "Zoomify=rgb.tif/TileGroup0/4-0-0.jpg",  # r above it
]


@pytest.mark.parametrize("query", ERRORS)
def test_error(iiif: ServerPair, images: ImageSet, query: str) -> None:
    """Same status; 404 texts equal without the prefix (policy §2); IIIF 400 texts are ours."""
    ref, ours = iiif[0].get(query), iiif[1].get(query)
    assert ref.status in (400, 404), _show(ref)
    problems = _common(ref, ours, images)
    if not problems:
        problems += compare_headers(ref, ours)
        expected = ref.body.replace(_prefix(images).encode(), b"")
        if ref.status == 404 and ours.body != expected:
            problems.append(f"404 text: expected {expected!r}, ours {ours.body!r}")
    _fail(query, ref, ours, problems)


#: (query, 1.1's status, ours, why). 1.1's status is checked too, so the record stays true.
DEPARTURES = [
    ("IIIF=rgb.tif/full/full/45/default.jpg", 400, 501, "decisions: unsupported rotation"),
    ("IIIF=rgb.tif/full/full/22.5/default.jpg", 400, 501, "decisions: unsupported rotation"),
    ("IIIF=rgb.tif/full/full/0/default.tif", 400, 501, "decisions: unsupported format"),
    ("IIIF=rgb.tif/full/full/0/default.gif", 400, 501, "decisions: unsupported format"),
    ("IIIF=rgb.tif/full/200,/0/default.png", 400, 200, "policy §1: PNG output"),
    ("IIIF=rgb.tif/full/200,/0/default.webp", 400, 200, "policy §1: WebP output"),
    ("IIIF=rgb.tif/Full/Max/0/Default.JPG", 200, 400, "issue: 400 for bad IIIF syntax"),
    ("IIIF=rgb.tif/full/200,/0/default", 200, 400, "issue: 400 for bad IIIF syntax"),
    ("IIIF=nonexist.tif", 303, 404, "issue: 404 for an unknown image"),
    ("DeepZoom=rgb.tif_files/10/4_0.jpg", 200, 404, "decisions: a tile outside the grid"),
    ("Zoomify=rgb.tif/TileGroup0/2-4-0.jpg", 200, 404, "decisions: a tile outside the grid"),
]


@pytest.mark.parametrize(
    ("query", "theirs", "mine", "why"), DEPARTURES, ids=[d[0].split("=", 1)[1] for d in DEPARTURES]
)
def test_departure(
    iiif: ServerPair, images: ImageSet, query: str, theirs: int, mine: int, why: str
) -> None:
    ref, ours = iiif[0].get(query), iiif[1].get(query)
    assert ref.status == theirs, f"iipsrv 1.1 changed: {_show(ref)}"
    problems = policy_problems(ours)
    if ours.status != mine:
        problems.append(f"status: ours {ours.status}, expected {mine} ({why})")
    elif mine == 200:
        ctype = ours.header("Content-Type")
        expected = "image/png" if query.endswith(".png") else "image/webp"
        if ctype != expected:
            problems.append(f"Content-Type {ctype!r}, expected {expected}")
    _fail(query, ref, ours, problems)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("rgb.tif", "full/200,/0/default"),
        ("rgb.tif", "0,0,512,512/256,/0/default"),
        ("rgb.tif", "768,0,232,256/232,/0/default"),
        ("grey.tif", "full/300,/0/gray"),
        ("odd.tif", "0,0,256,256/256,/90/default"),
        ("star.tif", "full/200,/0/default"),
    ],
)
def test_png_pixels(iiif: ServerPair, images: ImageSet, name: str, params: str) -> None:
    """Ours as PNG = 1.1's JPEG before encoding: our PNG pixels, JPEG-encoded with 1.1's
    settings (libjpeg, quality 75, 4:2:0), decode within tolerance of 1.1's JPEG."""
    ref_query, query = f"IIIF={name}/{params}.jpg", f"IIIF={name}/{params}.png"
    ref, ours = iiif[0].get(ref_query), iiif[1].get(query)
    assert _is_jpeg(ref), _show(ref)
    problems = policy_problems(ours)
    if ours.status != 200 or ours.header("Content-Type") != "image/png":
        problems.append(f"not a PNG: status {ours.status}, {ours.header('Content-Type')!r}")
    else:
        pixels = np.asarray(imagecodecs.png_decode(ours.body))
        grey = pixels.ndim == 2
        pixels = np.ascontiguousarray(pixels[..., None] if grey else pixels)
        jpeg = simplejpeg.encode_jpeg(
            pixels, quality=75, colorspace="GRAY" if grey else "RGB", colorsubsampling="420"
        )
        theirs = decode(ref.body)
        problems += array_problems(theirs, decode(jpeg), _tol(name))
    _fail(f"{query} (iipsrv: {ref_query})", ref, ours, problems)


def test_size_above_max_cvt(server_pair: ServerPairs, images: ImageSet) -> None:
    """MAX_CVT=300: ``full``/``max`` give the same fitted size; a size above it is 400 in ours
    (decisions) where 1.1 clamps it."""
    ref_server, our_server = server_pair(IIIF_VERSION="2", MAX_CVT="300")
    problems = []
    for params in ("full/full/0/default.jpg", "full/max/0/default.jpg"):
        query = f"IIIF=rgb.tif/{params}"
        ref, ours = ref_server.get(query), our_server.get(query)
        assert _is_jpeg(ref), _show(ref)
        if not _is_jpeg(ours) or _size(ours) != _size(ref):
            theirs = "x".join(map(str, _size(ref)))
            mine = "x".join(map(str, _size(ours))) if _is_jpeg(ours) else _show(ours)
            problems.append(f"{query}: iipsrv {theirs}, ours {mine}")
    query = "IIIF=rgb.tif/full/400,/0/default.jpg"
    ref, ours = ref_server.get(query), our_server.get(query)
    assert _is_jpeg(ref) and _size(ref) == (300, 225), _show(ref)
    if ours.status != 400:
        problems.append(f"{query}: ours {ours.status}, expected 400 (decisions)")
    _fail(query, ref, ours, problems)


# ----------------------------------------------------------------------------------------
# DeepZoom and Zoomify (§16, §22 cases 22-23)

XML_IMAGES = ["rgb.tif", "odd.tif", "star.tif", "single.tif", "meta.tif", "deep.tif", "f2.tif"]


@pytest.mark.parametrize("name", XML_IMAGES)
@pytest.mark.parametrize("kind", ["DeepZoom", "Zoomify"])
def test_descriptor(iiif: ServerPair, images: ImageSet, kind: str, name: str) -> None:
    """The .dzi and ImageProperties.xml texts byte for byte (CRLF layout of 1.1)."""
    query = f"DeepZoom={name}.dzi" if kind == "DeepZoom" else f"Zoomify={name}/ImageProperties.xml"
    ref, ours = iiif[0].get(query), iiif[1].get(query)
    assert ref.status == 200 and ref.header("Content-Type") == "application/xml", _show(ref)
    problems = _common(ref, ours, images)
    if not problems:
        problems += compare_headers(ref, ours)
        if ours.body != ref.body:
            problems.append(f"body: iipsrv {ref.body!r}, ours {ours.body!r}")
    _fail(query, ref, ours, problems)


def deepzoom_tiles(levels: list[tuple[int, int]], tile: int = 256) -> dict[int, list[str]]:
    """DeepZoom level → tile names ``x_y``: levels 0..D (every level below the pyramid maps to
    the smallest one) and D+1 (clamped to the full level)."""
    width, height = levels[0]
    n = len(levels)
    depth = math.ceil(math.log2(max(width, height)))
    out = {}
    for level in range(depth + 2):
        r = min(n - 1, max(0, level - (depth - n) - 1))
        lw, lh = levels[n - 1 - r]
        out[level] = [f"{x}_{y}" for y in range(-(-lh // tile)) for x in range(-(-lw // tile))]
    return out


def zoomify_tiles(levels: list[tuple[int, int]], tile: int = 256) -> dict[int, list[str]]:
    """Zoomify z → tile names ``z-x-y`` (levels smaller than a tile but one discarded)."""
    n = len(levels)
    small = sum(1 for w, h in levels if w < tile and h < tile)
    discard = max(0, small - 1)
    out = {}
    for z in range(n - discard):
        lw, lh = levels[n - 1 - (z + discard)]
        out[z] = [f"{z}-{x}-{y}" for y in range(-(-lh // tile)) for x in range(-(-lw // tile))]
    return out


TILE_IMAGES = {
    "rgb.tif": [(1000, 750), (500, 375), (250, 187)],
    "odd.tif": [(555, 777), (277, 388), (138, 194)],
    "star.tif": [(512, 384), (256, 192)],
    "single.tif": [(231, 173)],
    "deep.tif": [(300, 200), (150, 100), (75, 50), (37, 25)],
    "f2.tif": [(1000, 750), (500, 375), (250, 187)],
}
DEEPZOOM_LEVELS = [
    (name, level) for name, levels in TILE_IMAGES.items() for level in deepzoom_tiles(levels)
]
ZOOMIFY_LEVELS = [(name, z) for name, levels in TILE_IMAGES.items() for z in zoomify_tiles(levels)]


def _compare_tiles(iiif: ServerPair, images: ImageSet, name: str, queries: list[str]) -> None:
    problems = []
    for query in queries:
        ref, ours = iiif[0].get(query), iiif[1].get(query)
        assert _is_jpeg(ref), f"{query}: {_show(ref)}"
        found = _common(ref, ours, images)
        if not found:
            found += compare_headers(ref, ours)
            found += jpeg_problems(ref, ours, _tol(name))
        if found:
            problems.append(f"{query}: " + "; ".join(found))
    if problems:
        pytest.fail(f"{len(problems)} tile(s) differ:\n" + "\n".join(problems), pytrace=False)


@pytest.mark.parametrize(
    ("name", "level"), DEEPZOOM_LEVELS, ids=[f"{n}-L{lv}" for n, lv in DEEPZOOM_LEVELS]
)
def test_deepzoom_tiles(iiif: ServerPair, images: ImageSet, name: str, level: int) -> None:
    """Every tile of one DeepZoom level (case 22)."""
    assert _levels(images, name) == TILE_IMAGES[name], "conftest images changed"
    tiles = deepzoom_tiles(TILE_IMAGES[name])[level]
    _compare_tiles(iiif, images, name, [f"DeepZoom={name}_files/{level}/{t}.jpg" for t in tiles])


@pytest.mark.parametrize(
    ("name", "z"), ZOOMIFY_LEVELS, ids=[f"{n}-z{z}" for n, z in ZOOMIFY_LEVELS]
)
def test_zoomify_tiles(iiif: ServerPair, images: ImageSet, name: str, z: int) -> None:
    """Every tile of one Zoomify level (case 23); the TileGroup number is ignored."""
    assert _levels(images, name) == TILE_IMAGES[name], "conftest images changed"
    tiles = zoomify_tiles(TILE_IMAGES[name])[z]
    queries = [f"Zoomify={name}/TileGroup{i % 3}/{t}.jpg" for i, t in enumerate(tiles)]
    _compare_tiles(iiif, images, name, queries)


def test_case_22_23_bytes(iiif: ServerPair) -> None:
    """Cases 22-23 on 1.1 itself: DeepZoom and Zoomify tiles are JTL tiles (harness check that
    the level mappings above are 1.1's)."""
    ref = iiif[0]
    for query, jtl in (
        ("DeepZoom=rgb.tif_files/10/0_0.jpg", "FIF=rgb.tif&JTL=2,0"),
        ("DeepZoom=rgb.tif_files/0/0_0.jpg", "FIF=rgb.tif&JTL=0,0"),
        ("Zoomify=rgb.tif/TileGroup0/2-3-2.jpg", "FIF=rgb.tif&JTL=2,11"),
        ("DeepZoom=deep.tif_files/8/0_0.jpg", "FIF=deep.tif&JTL=2,0"),
        ("Zoomify=deep.tif/TileGroup0/0-0-0.jpg", "FIF=deep.tif&JTL=2,0"),
    ):
        assert ref.get(query).body == ref.get(jtl).body, (query, jtl)


def test_reference_did_not_crash(
    iiif: ServerPair, base_url_pair: ServerPair, server_pair: ServerPairs
) -> None:
    """Nothing above killed 1.1 (every pair started so far)."""
    crashes = {str(key): ref.crashes for key, (ref, _) in server_pair.pairs.items()}
    crashes["BASE_URL"] = base_url_pair[0].crashes
    assert all(not c for c in crashes.values()), crashes
