"""Path traversal through every identifier kind (policy §4): nothing outside FILESYSTEM_PREFIX.

The data root holds ``ok.tif`` (300×200), a symlink to a file outside, a symlink to a
directory outside and a symlinked directory inside. Next to it lies ``secret.tif``, a valid
TIFF of the distinctive size 123×77 (also copied into the outside directory, with an image
sequence). Each evil path is sent as a FIF (IIP and VisiOmatic 3), a IIIF identifier (query
style, path style with ``URI_MAP`` and nginx's raw ``REQUEST_URI``, and a WSGI server's decoded
``PATH_INFO``), a DeepZoom and a Zoomify identifier. Every answer must be a 4xx in the
protocol's own error format, show none of the secret's pixels or metadata, and name no server
path the client did not send. tests/test_paths.py covers ``resolve`` itself.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

import numpy as np
import pytest
from images import pyramid_levels, rgb_image, write_pyramid
from wsgi_client import Reply, call

from iipserver.app import make_app
from iipserver.settings import Settings
from iipserver.sources import paths

SECRET_SIZE = (123, 77)


@dataclass(frozen=True)
class Tree:
    base: Path
    data: Path  # the data root as configured (FILESYSTEM_PREFIX without the slash)
    real: Path  # its real path
    secret: Path


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    base = tmp_path_factory.mktemp("traversal")
    data = base / "data"
    (data / "sub").mkdir(parents=True)
    outside = base / "outside"
    outside.mkdir()
    ok = pyramid_levels(rgb_image(300, 200))
    write_pyramid(data / "ok.tif", ok, photometric="rgb")
    write_pyramid(data / "sub" / "ok.tif", ok, photometric="rgb")
    rng = np.random.default_rng(5)
    secret = rng.integers(0, 255, size=(SECRET_SIZE[1], SECRET_SIZE[0], 3), dtype=np.uint8)
    write_pyramid(base / "secret.tif", [secret], photometric="rgb", description="TOPSECRET 123 77")
    shutil.copy(base / "secret.tif", outside / "secret.tif")
    shutil.copy(base / "secret.tif", outside / "seq_pyr_000_090.tif")
    os.symlink(base / "secret.tif", data / "link_secret.tif")
    os.symlink("../secret.tif", data / "rel_secret.tif")
    os.symlink(outside, data / "link_dir")
    os.symlink(data / "sub", data / "linked_sub")
    os.symlink("/etc/passwd", data / "passwd")
    os.symlink("/etc", data / "etc")
    return Tree(base, data, Path(os.path.realpath(data)), base / "secret.tif")


def app_for(tree: Tree) -> Callable:
    paths.clear_resolutions()
    settings = {"FILESYSTEM_PREFIX": f"{tree.data}/", "URI_MAP": "iiif=>IIIF"}
    return make_app(Settings.from_environ(settings))


def wire(text: str) -> str:
    """A request string as a WSGI server hands it over: the raw bytes as latin-1 text."""
    return text.encode("utf-8").decode("latin-1")


U2024, UFF0E, U2215, UFF0F = "\u2024", "\uff0e", "\u2215", "\uff0f"

#: Paths (as sent on the wire, before the server's one URL-decoding) aimed at secret.tif in
#: the data root's parent, at /etc/passwd, or at the outside directory through symlinks.
#: ``{data}`` and ``{real}`` are replaced by the data root's configured and real paths.
ESCAPES = [
    # ../ in every encoding
    "../secret.tif",
    "../../../../../../../../etc/passwd",
    "sub/../../secret.tif",
    "./../secret.tif",
    "..%2fsecret.tif",
    "..%2Fsecret.tif",
    "%2e%2e/secret.tif",
    "%2e%2e%2fsecret.tif",
    "%2E%2e%2Fsecret.tif",
    "%2E%2E/%2E%2E/%2E%2E/%2E%2E/%2E%2E/%2E%2E/etc/passwd",
    "%252e%252e%252fsecret.tif",
    "%25252e%25252e%25252fsecret.tif",
    "..%252fsecret.tif",
    "....//secret.tif",
    "..././secret.tif",
    ".%2e/secret.tif",
    # backslashes
    "..\\secret.tif",
    "..%5csecret.tif",
    "..%5C..%5C..%5C..%5Cetc%5Cpasswd",
    "sub\\..\\..\\secret.tif",
    # absolute paths
    "/etc/passwd",
    "//etc/passwd",
    "%2fetc%2fpasswd",
    "%2F%2Fetc%2Fpasswd",
    "{data}/../secret.tif",
    "{real}/../secret.tif",
    "{real}%2f..%2fsecret.tif",
    "{base}/secret.tif",
    "file:///etc/passwd",
    # Unicode dots and slashes, overlong UTF-8
    f"{U2024}{U2024}/secret.tif",
    "%e2%80%a4%e2%80%a4/secret.tif",
    f"{UFF0E}{UFF0E}/secret.tif",
    "%ef%bc%8e%ef%bc%8e/secret.tif",
    f"..{U2215}secret.tif",
    "..%e2%88%95secret.tif",
    f"..{UFF0F}secret.tif",
    "..%ef%bc%8fsecret.tif",
    "%c0%ae%c0%ae/secret.tif",
    "%c0%ae%c0%ae%c0%afsecret.tif",
    "%e0%80%ae%e0%80%ae/secret.tif",
    "%c0%2e%c0%2e/secret.tif",
    "..%c0%afsecret.tif",
    "..%c1%9csecret.tif",
    "%u002e%u002e/secret.tif",
    # NUL
    "../secret.tif%00",
    "../secret.tif%00.tif",
    "ok.tif%00/../../secret.tif",
    "%00../secret.tif",
    "%00",
    # very long paths
    "a/" * 5000 + "../secret.tif",
    "../" * 3400 + "etc/passwd",
    "x" * 10000,
    "sub/" + "./" * 5000 + "../../secret.tif",
    # symlinks inside the data root pointing outside
    "link_secret.tif",
    "rel_secret.tif",
    "link_dir/secret.tif",
    "link_dir/./secret.tif",
    "link_dir//secret.tif",
    "link_dir/seq",
    "passwd",
    "etc/passwd",
    "linked_sub/../../secret.tif",
    "linked_sub/../link_secret.tif",
    # ; ? # tricks
    "ok.tif;/../../secret.tif",
    "..;/secret.tif",
    "ok.tif%3b/../../secret.tif",
    "ok.tif%3f/../../secret.tif",
    "ok.tif%23/../../secret.tif",
    "ok.tif#/../../secret.tif",
    "..%3fsecret.tif",
    # trailing dots and spaces
    "../secret.tif.",
    "../secret.tif%20",
    "../secret.tif.%20.",
    "..%20/secret.tif",
    "...%2fsecret.tif",
    ".. /secret.tif",
    "../secret.tif::$DATA",
    "../secret.tif/",
    "../secret.tif/.",
]


def utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def expand(template: str, tree: Tree) -> str:
    return wire(
        template.replace("{data}", str(tree.data))
        .replace("{real}", str(tree.real))
        .replace("{base}", str(tree.base))
    )


def id_for(template: str) -> str:
    text = template if len(template) < 40 else f"{template[:24]}…({len(template)})"
    return text.encode("unicode_escape").decode()


@dataclass(frozen=True)
class Kind:
    """One way of naming an image: builds the request and knows the error format."""

    name: str
    build: Callable[[str], tuple[str, str]]  # path → (query, request path)
    error: str  # "iip", "text" or "json"


ENDPOINT = "/fcgi-bin/iipsrv.fcgi"

KINDS = [
    Kind("fif-obj", lambda p: (f"FIF={p}&OBJ=IIP,1.0&OBJ=Max-size&OBJ=subject", ENDPOINT), "iip"),
    Kind("fif-jtl", lambda p: (f"FIF={p}&JTL=0,0", ENDPOINT), "iip"),
    Kind("fif-cvt", lambda p: (f"FIF={p}&WID=100&CVT=png", ENDPOINT), "iip"),
    Kind("visiomatic-info", lambda p: (f"FIF={p}&INFO", ENDPOINT), "json"),
    Kind("visiomatic-tile", lambda p: (f"FIF={p}&CHAN=1&JTL=0,0", ENDPOINT), "json"),
    Kind("iiif-info", lambda p: (f"IIIF={p}/info.json", ENDPOINT), "text"),
    Kind("iiif-image", lambda p: (f"IIIF={p}/full/max/0/default.png", ENDPOINT), "text"),
    Kind("iiif-base", lambda p: (f"IIIF={p}", ENDPOINT), "text"),
    Kind("iiif-path-info", lambda p: ("", f"/iiif/{p}/info.json"), "text"),
    Kind("iiif-path-image", lambda p: ("", f"/iiif/{p}/0,0,50,50/max/0/default.png"), "text"),
    Kind("deepzoom-dzi", lambda p: (f"DeepZoom={p}.dzi", ENDPOINT), "text"),
    Kind("deepzoom-tile", lambda p: (f"DeepZoom={p}_files/0/0_0.jpg", ENDPOINT), "text"),
    Kind("zoomify-xml", lambda p: (f"Zoomify={p}/ImageProperties.xml", ENDPOINT), "text"),
    Kind("zoomify-tile", lambda p: (f"Zoomify={p}/TileGroup0/0-0-0.jpg", ENDPOINT), "text"),
]


def send(app: Callable, kind: Kind, path: str) -> Reply:
    query, where = kind.build(path)
    return call(app, query, path=where)


def decoded_path_environ(path: str) -> dict:
    """A WSGI server without REQUEST_URI: PATH_INFO already URL-decoded once."""
    return {
        "REQUEST_METHOD": "GET",
        "QUERY_STRING": "",
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "HTTP_HOST": "localhost",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.input": io.BytesIO(),
        "wsgi.url_scheme": "http",
    }


def call_environ(app: Callable, environ: dict) -> Reply:
    captured: dict = {}

    def start_response(status, headers, exc_info=None):
        captured["status"] = int(status.split()[0])
        captured["headers"] = list(headers)

    body = b"".join(app(environ, start_response))
    return Reply(captured["status"], captured["headers"], body)


def check_refused(reply: Reply, kind: Kind, sent: str, tree: Tree, template: str = "") -> None:
    """A 4xx in ``kind``'s error format, nothing of the secret, no unsent server path."""
    if template.startswith("ok.tif%3f") and reply.status == 303:
        # a decoded "?" ends a IIIF request: "ok.tif?/../../secret.tif" is "ok.tif"
        location = reply.header("Location") or ""
        assert location.endswith(("IIIF=ok.tif/info.json", "/ok.tif/info.json")), location
        return
    assert 400 <= reply.status < 500, (reply.status, reply.body[:200])
    media = reply.header("Content-Type") or ""
    assert reply.header("Content-Length") == str(len(reply.body))
    if kind.error == "json":
        assert media == "application/json"
        detail = json.loads(reply.body)["detail"]
        assert isinstance(detail, list) and detail
    elif kind.error == "text":
        assert media.startswith("text/plain")
        assert reply.status in (400, 404)
    else:  # IIP: the 404 text of a missing image, or an Error/ line, or the banner
        assert media.startswith(("text/plain", "application/vnd.netfpx", "text/html"))
        if media.startswith("application/vnd.netfpx"):
            assert reply.body.startswith(b"Error/")
    assert not media.startswith("image/")
    body = reply.body
    raw = sent.encode("latin-1")
    forms = raw + b"\n" + unquote_to_bytes(raw) + b"\n" + unquote_to_bytes(unquote_to_bytes(raw))
    assert b"TOPSECRET" not in body and b"root:x:0:0" not in body
    assert b"123" not in body or b"123" in forms
    assert b"77" not in body or b"77" in forms
    for secret in (str(tree.base), str(tree.real), str(tree.data), str(tree.secret), "/etc"):
        if secret.encode() not in forms:  # a path the client sent may be echoed, no other
            assert secret.encode() not in body, secret


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_the_image_inside_is_served(tree, kind):
    """The control: every kind reaches ok.tif, also through a symlinked directory."""
    app = app_for(tree)
    inside = ("ok.tif", "linked_sub/ok.tif", "sub%2fok.tif")
    for path in inside[:1] if kind.name == "iiif-base" else inside:  # base URI: no "/" in it
        reply = send(app, kind, path)
        expected = 303 if kind.name == "iiif-base" else 200
        assert reply.status == expected, (kind.name, path, reply.status, reply.body[:200])


@pytest.mark.parametrize("template", ESCAPES, ids=id_for)
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_escapes_are_refused(tree, kind, template):
    path = expand(template, tree)
    query, where = kind.build(path)
    reply = send(app_for(tree), kind, path)
    check_refused(reply, kind, query + where, tree, template)


@pytest.mark.parametrize("template", ESCAPES, ids=id_for)
def test_escapes_through_a_decoded_path_info(tree, template):
    """A WSGI server that sends no REQUEST_URI decodes PATH_INFO once, the IIIF command again:
    the second decoding still happens before confinement."""
    path = expand(template, tree)
    if "#" in path or "?" in path:
        pytest.skip("not part of a path a WSGI server decodes")
    kind = next(k for k in KINDS if k.name == "iiif-path-info")
    reply = call_environ(app_for(tree), decoded_path_environ(f"/iiif/{path}/info.json"))
    check_refused(reply, kind, path, tree, template)


@pytest.mark.parametrize(
    "template", ["link_secret.tif", "link_dir/secret.tif", "../secret.tif", "{real}/../secret.tif"]
)
def test_escapes_through_percent_encoded_identifiers(tree, template):
    """IIIF identifiers are often sent fully percent-encoded (``/`` as ``%2F``)."""
    path = quote(expand(template, tree), safe="")
    app = app_for(tree)
    for kind in KINDS:
        reply = send(app, kind, path)
        check_refused(reply, kind, kind.build(path)[0] + kind.build(path)[1], tree)


def test_a_symlink_swapped_to_the_outside_is_refused_after_the_cache(tree):
    """A link that pointed inside and now points outside is refused once the remembered
    resolution expires (at most paths.RESOLVE_TTL seconds; cleared here)."""
    link = tree.data / "swap.tif"
    os.symlink(tree.data / "ok.tif", link)
    try:
        app = app_for(tree)
        assert call(app, "FIF=swap.tif&OBJ=Max-size").body == b"\r\nMax-size:300 200\r\n"
        link.unlink()
        os.symlink(tree.secret, link)
        paths.clear_resolutions()
        app.clear_caches()
        for kind in KINDS:
            check_refused(send(app, kind, "swap.tif"), kind, "swap.tif", tree)
    finally:
        link.unlink()


def test_no_prefix_relative_dotdot_is_still_refused(tree, monkeypatch):
    """Without FILESYSTEM_PREFIX (iipsrv's default) any path is allowed but ``..``."""
    monkeypatch.chdir(tree.data)
    paths.clear_resolutions()
    app = make_app(Settings.from_environ({}))
    for path in ("../secret.tif", "..%2fsecret.tif", "sub/../../secret.tif", "..\\secret.tif"):
        reply = call(app, f"FIF={path}&OBJ=Max-size")
        assert reply.status == 404
        assert b"Max-size" not in reply.body
