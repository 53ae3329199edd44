"""Path confinement (policy §4): nothing outside FILESYSTEM_PREFIX is ever opened."""

import os

import pytest
from images import pyramid_levels, rgb_image, write_pyramid
from wsgi_client import call

from iipserver.app import make_app
from iipserver.errors import ImageNotFound
from iipserver.settings import Settings
from iipserver.sources.paths import resolve


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    base = tmp_path_factory.mktemp("tree")
    root = base / "images"
    (root / "sub").mkdir(parents=True)
    outside = base / "secret"
    outside.mkdir()
    sibling = base / "images2"
    sibling.mkdir()
    levels = pyramid_levels(rgb_image(300, 200))
    write_pyramid(root / "in.tif", levels, photometric="rgb")
    write_pyramid(root / "sub" / "deep.tif", levels, photometric="rgb")
    write_pyramid(outside / "out.tif", levels, photometric="rgb")
    write_pyramid(sibling / "sib.tif", levels, photometric="rgb")
    os.symlink(outside / "out.tif", root / "link_out.tif")
    os.symlink(outside, root / "dirlink")
    os.symlink(root / "sub" / "deep.tif", root / "link_in.tif")
    return base


PREFIX_ESCAPES = [
    "../secret/out.tif",
    "sub/../../secret/out.tif",
    "%2e%2e/secret/out.tif",
    "%2E%2E%2Fsecret%2Fout.tif",
    "..%2fsecret/out.tif",
    "....//secret/out.tif",
    "link_out.tif",
    "dirlink/out.tif",
    "in.tif%00.jpg",
    "%00",
    "..\\secret\\out.tif",
]


@pytest.mark.parametrize("fif", PREFIX_ESCAPES)
def test_escapes_are_404_without_server_paths(tree, fif):
    prefix = str(tree / "images") + "/"
    app = make_app(Settings.from_environ({"FILESYSTEM_PREFIX": prefix}))
    reply = call(app, f"FIF={fif}&OBJ=IIP,1.0&OBJ=Max-size")
    assert reply.status == 404
    assert str(tree).encode() not in reply.body
    assert b"Max-size" not in reply.body


def test_absolute_path_stays_under_the_prefix(tree):
    prefix = str(tree / "images") + "/"
    app = make_app(Settings.from_environ({"FILESYSTEM_PREFIX": prefix}))
    outside = str(tree / "secret" / "out.tif")
    assert call(app, f"FIF={outside}&OBJ=Max-size").status == 404
    # an absolute path that names a file inside the prefix is prefix + path, which does not exist
    assert call(app, f"FIF={prefix}in.tif&OBJ=Max-size").status == 404


def test_prefix_without_slash_cannot_reach_a_sibling_directory(tree):
    prefix = str(tree / "images")  # no trailing slash: iipsrv concatenates verbatim
    app = make_app(Settings.from_environ({"FILESYSTEM_PREFIX": prefix}))
    assert call(app, "FIF=2/sib.tif&OBJ=Max-size").status == 404
    assert call(app, "FIF=/in.tif&OBJ=Max-size").status == 200


@pytest.mark.parametrize(
    "fif", ["in.tif", "sub/deep.tif", "link_in.tif", "sub/./deep.tif", "sub//deep.tif"]
)
def test_paths_inside_are_served(tree, fif):
    prefix = str(tree / "images") + "/"
    app = make_app(Settings.from_environ({"FILESYSTEM_PREFIX": prefix}))
    reply = call(app, f"FIF={fif}&OBJ=Max-size")
    assert reply.status == 200
    assert reply.body == b"\r\nMax-size:300 200\r\n"


def test_suffix_is_appended(tree):
    prefix = str(tree / "images") + "/"
    app = make_app(
        Settings.from_environ({"FILESYSTEM_PREFIX": prefix, "FILESYSTEM_SUFFIX": ".tif"})
    )
    assert call(app, "FIF=in&OBJ=Max-size").body == b"\r\nMax-size:300 200\r\n"


def test_resolve_message_names_only_the_requested_path(tree):
    with pytest.raises(ImageNotFound) as info:
        resolve("../secret/out.tif", str(tree / "images") + "/")
    assert str(tree) not in info.value.message
    assert info.value.message == "../secret/out.tif is neither a file nor part of an image sequence"


def test_very_long_path_is_refused(tree):
    with pytest.raises(ImageNotFound):
        resolve("a/" * 5000, str(tree / "images") + "/")
