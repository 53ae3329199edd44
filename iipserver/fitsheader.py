"""FITS headers kept in a TIFF ImageDescription (STIFF's layout): parse, add a CD matrix, format.

STIFF writes the FITS header of the source image as 80-column cards, concatenated without
separators (some writers put a newline after each card). VisiOmatic's clients read only the
``CDi_j`` form of the WCS matrix, so a header that gives ``CDELTi`` with ``PCi_j`` or ``CROTA2``
gets an equivalent CD matrix added.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

CARD = 80
_KEY = re.compile(r"^[A-Z0-9_-]{0,8}$")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([EeDd][+-]?\d+)?$")
_COMMENTARY = ("COMMENT", "HISTORY", "")

FitsValue = bool | int | float | str | None


@dataclass(frozen=True)
class Card:
    """One header card: keyword, raw value text (None for commentary cards) and comment."""

    key: str
    value: str | None
    comment: str = ""

    def parsed(self) -> FitsValue:
        """The value as a Python object: bool, int, float or str (None if absent)."""
        return parse_value(self.value)


def parse_value(text: str | None) -> FitsValue:
    """Interpret a FITS value field: quoted string, logical, integer or real."""
    if text is None:
        return None
    text = text.strip()
    if text.startswith("'"):
        body = text[1:]
        out, i = [], 0
        while i < len(body):
            if body[i] == "'":
                if body[i + 1 : i + 2] == "'":
                    out.append("'")
                    i += 2
                    continue
                break
            out.append(body[i])
            i += 1
        return "".join(out).rstrip()
    if text in ("T", "F"):
        return text == "T"
    if _NUMBER.match(text):
        if re.match(r"^[+-]?\d+$", text):
            return int(text)
        return float(text.replace("D", "E").replace("d", "e"))
    return text or None


def _split_value_comment(field: str) -> tuple[str, str]:
    """Split the text after ``= `` into value and comment (a ``/`` outside quotes)."""
    in_quote = False
    for i, c in enumerate(field):
        if c == "'":
            in_quote = not in_quote
        elif c == "/" and not in_quote:
            return field[:i].strip(), field[i + 1 :].strip()
    return field.strip(), ""


def split_cards(text: str) -> list[str]:
    """Cut a header into 80-column card images (newline-separated or concatenated)."""
    if "\n" in text:
        lines: list[str] = []
        for line in text.replace("\r", "").split("\n"):
            lines.extend(line[i : i + CARD] for i in range(0, max(len(line), 1), CARD))
        return [line for line in lines if line]
    return [text[i : i + CARD] for i in range(0, len(text), CARD)]


def looks_like_fits(text: str) -> bool:
    """True if ``text`` starts with a FITS primary or extension header card."""
    head = text.lstrip("\n")[:10]
    return head.startswith("SIMPLE  =") or head.startswith("XTENSION=")


def parse(text: str) -> list[Card]:
    """Parse a header into cards, stopping at ``END``."""
    cards = []
    for image in split_cards(text):
        key = image[:8].strip().upper()
        if key == "END":
            break
        if image[8:10] == "= " and key not in _COMMENTARY and _KEY.match(key):
            value, comment = _split_value_comment(image[10:])
            cards.append(Card(key, value, comment))
        else:
            cards.append(Card(key, None, image[8:].rstrip()))
    return cards


def values(cards: list[Card]) -> dict[str, FitsValue]:
    """Keyword → value for the cards with values (the last one wins, as in astropy)."""
    return {c.key: c.parsed() for c in cards if c.value is not None}


def cd_matrix(header: Mapping[str, FitsValue]) -> dict[str, float] | None:
    """The CD matrix for a header that gives CDELT (with PC or CROTA2) but no CD; else None."""
    if any(k in header for k in ("CD1_1", "CD1_2", "CD2_1", "CD2_2")):
        return None
    if "CDELT1" not in header and "CDELT2" not in header:
        return None

    def number(key: str, default: float) -> float:
        value = header.get(key, default)
        return (
            float(value)
            if isinstance(value, int | float) and not isinstance(value, bool)
            else default
        )

    cdelt1, cdelt2 = number("CDELT1", 1.0), number("CDELT2", 1.0)
    if any(k in header for k in ("PC1_1", "PC1_2", "PC2_1", "PC2_2")):
        pc = [
            [number("PC1_1", 1.0), number("PC1_2", 0.0)],
            [number("PC2_1", 0.0), number("PC2_2", 1.0)],
        ]
        return {
            "CD1_1": cdelt1 * pc[0][0],
            "CD1_2": cdelt1 * pc[0][1],
            "CD2_1": cdelt2 * pc[1][0],
            "CD2_2": cdelt2 * pc[1][1],
        }
    rho = math.radians(number("CROTA2", 0.0))
    return {
        "CD1_1": cdelt1 * math.cos(rho),
        "CD1_2": -cdelt2 * math.sin(rho),
        "CD2_1": cdelt1 * math.sin(rho),
        "CD2_2": cdelt2 * math.cos(rho),
    }


def format_value(value: FitsValue) -> str:
    """A FITS fixed-format value field (columns 11–30)."""
    if isinstance(value, bool):
        return f"{'T' if value else 'F':>20}"
    if isinstance(value, int):
        return f"{value:>20d}"
    if isinstance(value, float):
        text = repr(value).upper()
        if "E" not in text and "." not in text:
            text += "."
        if len(text) > 20:
            text = f"{value:.13E}" if abs(value) < 1 else f"{value:.14G}"
        return f"{text:>20}"
    if value is None:
        return " " * 20
    quoted = "'" + str(value).replace("'", "''").ljust(8) + "'"
    return f"{quoted:<20}"


def format_card(key: str, value: FitsValue, comment: str = "") -> str:
    """One 80-column card ``KEYWORD = value / comment``."""
    card = f"{key:<8}= {format_value(value)}"
    if comment:
        card += f" / {comment}"
    return card[:CARD].ljust(CARD)


def with_cd_matrix(text: str) -> str:
    """Return the header with CD cards added after the last WCS card if it lacks them.

    The header keeps its layout (concatenated 80-column cards); a header that already has a CD
    matrix, or no CDELT at all, is returned unchanged.
    """
    cards = split_cards(text)
    header = values(parse(text))
    cd = cd_matrix(header)
    if cd is None:
        return text
    new = [format_card(k, v, "Linear projection matrix") for k, v in cd.items()]
    wcs = {"CDELT1", "CDELT2", "CROTA2", "PC1_1", "PC1_2", "PC2_1", "PC2_2", "CRVAL2", "CRPIX2"}
    at = max((i for i, c in enumerate(cards) if c[:8].strip() in wcs), default=None)
    if at is None:
        at = next((i for i, c in enumerate(cards) if c[:8].strip() == "END"), len(cards)) - 1
    cards[at + 1 : at + 1] = new
    end = next((i for i, c in enumerate(cards) if c[:8].strip() == "END"), None)
    if end is not None:  # absorb the new cards into the blank padding after END
        blank = " " * CARD
        while len(cards) > end + 1 and len(cards) % 36 and cards[-1].ljust(CARD) == blank:
            cards.pop()
        if len(text) % 2880 == 0 and "\n" not in text:
            cards += [blank] * (-len(cards) % 36)
    joiner = "\n" if "\n" in text else ""
    return joiner.join(c.ljust(CARD) if not joiner else c for c in cards)


def minimal_header(width: int, height: int, channels: int, bits: int, is_float: bool) -> str:
    """A pixel-coordinate header for an image without one (80-column cards, END, padded)."""
    cards = [
        format_card("SIMPLE", True, "conforms to FITS standard"),
        format_card("BITPIX", -bits if is_float else bits, "bits per data value"),
        format_card("NAXIS", 3 if channels > 1 else 2, "number of data axes"),
        format_card("NAXIS1", width, "image width"),
        format_card("NAXIS2", height, "image height"),
    ]
    if channels > 1:
        cards.append(format_card("NAXIS3", channels, "number of channels"))
    cards += [
        format_card("CTYPE1", "PIXEL", "pixel coordinates"),
        format_card("CTYPE2", "PIXEL", "pixel coordinates"),
        format_card("CRPIX1", 1.0),
        format_card("CRPIX2", 1.0),
        format_card("CRVAL1", 1.0),
        format_card("CRVAL2", 1.0),
        format_card("CD1_1", 1.0),
        format_card("CD1_2", 0.0),
        format_card("CD2_1", 0.0),
        format_card("CD2_2", 1.0),
        "END".ljust(CARD),
    ]
    text = "".join(cards)
    return text.ljust(-(-len(text) // 2880) * 2880)


def header_dict(cards: list[Card]) -> dict[str, FitsValue]:
    """Keyword → value as astropy's ``dict(header.items())`` gives it: commentary cards
    (COMMENT, HISTORY, blank keyword) map to their text; a repeated key keeps its first
    position and its last value."""
    out: dict[str, FitsValue] = {}
    for card in cards:
        out[card.key] = card.comment.strip() if card.value is None else card.parsed()
    return out


_WCS_MATRIX = re.compile(r"^(CDELT\d|CROTA\d|PC\d_\d|PC0\d\d0\d\d)$")


def display_header(
    cards: list[Card], width: int, height: int, channels: int
) -> dict[str, FitsValue]:
    """The merged header VisiOmatic 3 advertises: sizes set, a CD matrix, no CDELT/PC/CROTA.

    New keys go after the last valued card (before trailing commentary cards), as astropy
    appends them.
    """
    header = header_dict(cards)
    commentary = {k: header.pop(k) for k in [k for k in header if k in _COMMENTARY]}
    header.update({"NAXIS1": width, "NAXIS2": height, "NAXIS3": channels})
    valued = {k: v for k, v in header.items() if v is not None}
    cd = cd_matrix(valued)
    if cd is None and not any(k in valued for k in ("CD1_1", "CD1_2", "CD2_1", "CD2_2")):
        header.setdefault("CRPIX1", 1)
        header.setdefault("CRPIX2", 1)
        cd = {"CD1_1": 1.0, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": 1.0}
    if cd is not None:
        header.update(cd)
    for key in [k for k in header if _WCS_MATRIX.match(k)]:
        del header[key]
    header.update(commentary)
    return header
