"""Body formats of PFL (JSON), SPECTRA (XML) and TIL (binary records), as iipsrv 1.1 writes them.

Departures (policy §2): PFL's JSON is valid (``null`` for NaN/Inf, quoted keys for sequences).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _profile_value(value: float, is_float: bool) -> str:
    if is_float:
        return f"{value:.9f}" if math.isfinite(value) else "null"
    return f"{float(np.float32(value)):g}"


def profile_values(samples: np.ndarray, is_float: bool) -> str:
    """Interleaved samples (pixel by pixel, all channels) as a JSON array."""
    values = samples.reshape(-1).tolist()
    return "[" + ",".join(_profile_value(v, is_float) for v in values) + "]"


def profile_body(views: Sequence[tuple[int, np.ndarray]], is_float: bool) -> bytes:
    """PFL JSON: one array, or an object keyed by horizontal angle for several views."""
    if len(views) == 1:
        text = '{\n\t"profile": ' + profile_values(views[0][1], is_float) + "\n}"
    else:
        parts = [f'\t\t"{angle}": {profile_values(data, is_float)}' for angle, data in views]
        text = '{\n\t"profile": {\n' + ",\n".join(parts) + "\n\t}\n}"
    return text.encode()


def reflectance(value: float, dtype: np.dtype) -> str:
    """SPECTRA value: 8- and 16-bit scaled to [0, 1] in float, others as they are; ``%f``."""
    if dtype == np.uint8:
        value = float(np.float32(np.float32(value) / np.float32(255.0)))
    elif dtype == np.uint16:
        value = float(np.float32(np.float32(value) / np.float32(65535.0)))
    return f"{float(value):f}"


def spectra_body(points: Sequence[tuple[int, str]]) -> bytes:
    """SPECTRA XML: one ``<point>`` per horizontal view (angle as the wavelength)."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>\n<spectra>\n']
    for angle, value in points:
        out.append(
            f"\t<point>\n\t\t<wavelength>{angle}</wavelength>\n"
            f"\t\t<reflectance>{value}</reflectance>\n\t</point>\n"
        )
    out.append("</spectra>")
    return "".join(out).encode()


def til_record(resolution: int, index: int, data: bytes, bits: int) -> bytes:
    """One TIL record: ``Tile,r,n,0/<len+8>:``, compression type, subtype, data, CRLF."""
    kind = {8: 2, 16: 3}.get(bits, 0)
    head = f"Tile,{resolution},{index},0/{len(data) + 8}:".encode()
    return head + kind.to_bytes(4, "little") + b"\x00\x11\x00\x00" + data + b"\r\n"
