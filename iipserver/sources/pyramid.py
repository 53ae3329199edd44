"""Reduced pyramid levels of float images: the 2×2 mean of finite values, whole or streamed.

One definition serves the FITS source (tiles computed on demand, levels built into the on-disk
cache) and the FITS → TIFF converter, so that a tile is the same float32 value whichever of
them produced it. Levels halve with floor (``w >> k``, ``h >> k``): pixel ``(i, j)`` of level
``k`` is the iterated mean over the aligned ``2^k × 2^k`` block of the full-resolution image,
so any tile can be computed from its footprint alone.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

_F32 = np.float32


def level_sizes(width: int, height: int, tile: int) -> list[tuple[int, int]]:
    """Sizes of the pyramid, full resolution first: halvings until a level fits one tile
    (or a side would reach 0)."""
    sizes = [(width, height)]
    while (width > tile or height > tile) and width >= 2 and height >= 2:
        width, height = width // 2, height // 2
        sizes.append((width, height))
    return sizes


def halve(block: np.ndarray) -> np.ndarray:
    """2×2 mean of the finite values of ``(h, w, c)`` float32 pixels, floor halving.

    A block with no finite value gives NaN. Sums are taken in float32 in one fixed order,
    ``((a00 + a10) + (a01 + a11)) / n``, on every path, so results do not depend on whether
    a block held NaNs elsewhere in the array.
    """
    h, w = block.shape[0] // 2, block.shape[1] // 2
    a = block[: 2 * h, : 2 * w]
    if a.dtype != _F32:
        a = a.astype(_F32)
    with np.errstate(invalid="ignore", over="ignore"):
        rows = a[0::2] + a[1::2]
        total = rows[:, 0::2] + rows[:, 1::2]
        if np.isfinite(total).all():
            total *= _F32(0.25)
            return total
        finite = np.isfinite(a)
        zeroed = np.where(finite, a, _F32(0.0))
        rows = zeroed[0::2] + zeroed[1::2]
        total = rows[:, 0::2] + rows[:, 1::2]
        counts = finite[0::2].astype(np.uint8) + finite[1::2]
        counts = (counts[:, 0::2] + counts[:, 1::2]).astype(_F32)
        out = total / counts  # 0/0 → NaN where no value was finite
    return out


def reduce(block: np.ndarray, steps: int) -> np.ndarray:
    """``halve`` applied ``steps`` times."""
    for _ in range(steps):
        block = halve(block)
    return block


class PyramidStream:
    """Build reduced levels from full-resolution rows pushed top to bottom, in bounded memory.

    ``sink(level, y, rows)`` receives each reduced level's rows in order, in bands of
    ``band`` rows (the last band of a level may be shorter); ``level`` counts halvings from
    full resolution (1 = half size). Memory held: under two bands per level.
    """

    def __init__(
        self,
        sizes: list[tuple[int, int]],
        sink: Callable[[int, int, np.ndarray], None],
        band: int,
    ) -> None:
        self._sizes = sizes
        self._sink = sink
        self._band = band
        depth = len(sizes)
        self._carry: list[np.ndarray | None] = [None] * depth
        self._pending: list[list[np.ndarray]] = [[] for _ in range(depth)]
        self._pending_rows = [0] * depth
        self._done = [0] * depth  # rows received per level

    def push(self, rows: np.ndarray) -> None:
        """Add the next full-resolution rows, ``(n, width, channels)`` float32."""
        self._receive(0, rows)

    def _receive(self, level: int, rows: np.ndarray) -> None:
        height = self._sizes[level][1]
        rows = rows[: max(0, height - self._done[level])]
        if rows.shape[0] == 0:
            return
        self._done[level] += rows.shape[0]
        if level > 0:
            self._pending[level].append(rows)
            self._pending_rows[level] += rows.shape[0]
            self._flush(level, final=False)
        if level + 1 >= len(self._sizes):
            return
        carry = self._carry[level]
        if carry is not None:
            rows = np.concatenate([carry, rows])
        even = rows.shape[0] // 2 * 2
        self._carry[level] = rows[even:] if even < rows.shape[0] else None
        if even:
            self._receive(level + 1, halve(rows[:even]))

    def _flush(self, level: int, final: bool) -> None:
        while self._pending_rows[level] >= self._band or (final and self._pending_rows[level]):
            rows = (
                np.concatenate(self._pending[level])
                if len(self._pending[level]) > 1
                else (self._pending[level][0])
            )
            take = min(self._band, rows.shape[0])
            y = self._done[level] - self._pending_rows[level]
            self._sink(level, y, rows[:take])
            rest = rows[take:]
            self._pending[level] = [rest] if rest.shape[0] else []
            self._pending_rows[level] = rest.shape[0]

    def finish(self) -> None:
        """Emit what remains of every level (call once, after the last ``push``)."""
        for level in range(1, len(self._sizes)):
            self._flush(level, final=True)
