"""Settings: defaults, parsing, loud rejection, and conf/iipserver.env kept in sync."""

import dataclasses
import re
from pathlib import Path

import pytest

from iipserver.errors import ConfigError
from iipserver.settings import Settings, documented_variables

ENV_FILE = Path(__file__).resolve().parent.parent / "conf" / "iipserver.env"


def test_defaults_are_iipsrv_defaults():
    s = Settings.from_environ({})
    assert s.jpeg_quality == 75
    assert s.max_cvt == 5000
    assert s.max_image_cache_size == 10.0
    assert s.max_metadata_cache_size == 1000
    assert s.filesystem_prefix == ""
    assert s.cache_control == "max-age=86400"
    assert s.allow_upscaling is True
    assert s.interpolation == 1
    assert s.filename_pattern == "_pyr_"
    assert s.memcached_timeout == 86400
    assert s.cors == ""


def test_values_are_read_from_the_environment():
    s = Settings.from_environ(
        {
            "JPEG_QUALITY": "90",
            "MAX_CVT": "-1",
            "FILESYSTEM_PREFIX": "/srv/img/",
            "CORS": "*",
            "ALLOW_UPSCALING": "0",
            "MAX_IMAGE_CACHE_SIZE": "2.5",
        }
    )
    assert (s.jpeg_quality, s.max_cvt, s.filesystem_prefix, s.cors) == (90, -1, "/srv/img/", "*")
    assert s.allow_upscaling is False
    assert s.max_image_cache_size == 2.5


def test_documented_alias_of_metadata_cache_size():
    assert (
        Settings.from_environ({"MAX_IMAGE_METADATA_CACHE_SIZE": "5"}).max_metadata_cache_size == 5
    )
    both = {"MAX_IMAGE_METADATA_CACHE_SIZE": "5", "MAX_METADATA_CACHE_SIZE": "7"}
    assert Settings.from_environ(both).max_metadata_cache_size == 7


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("JPEG_QUALITY", "abc"),
        ("JPEG_QUALITY", "0"),
        ("JPEG_QUALITY", "101"),
        ("MAX_CVT", "ten"),
        ("MAX_CVT", "0"),
        ("MAX_CVT", "-5"),
        ("MAX_IMAGE_CACHE_SIZE", "-1"),
        ("MAX_IMAGE_CACHE_SIZE", "nan"),
        ("WATERMARK_OPACITY", "2"),
        ("INTERPOLATION", "3"),
        ("ALLOW_UPSCALING", "maybe"),
        ("URI_MAP", "iiif"),
        ("VERBOSITY", "x"),
    ],
)
def test_bad_values_stop_start_up_naming_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        Settings.from_environ({name: value})


def test_settings_are_frozen():
    s = Settings.from_environ({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.jpeg_quality = 10  # type: ignore[misc]
    assert s.replace(jpeg_quality=10).jpeg_quality == 10
    assert s.jpeg_quality == 75


def test_env_file_documents_every_variable_and_no_other():
    text = ENV_FILE.read_text()
    listed = re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, flags=re.MULTILINE)
    assert sorted(set(listed)) == sorted(documented_variables())
    assert len(listed) == len(set(listed))


def test_env_file_defaults_match_settings():
    text = ENV_FILE.read_text()
    values = dict(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=(.*)$", text, flags=re.MULTILINE))
    assert Settings.from_environ(values) == Settings.from_environ({})
