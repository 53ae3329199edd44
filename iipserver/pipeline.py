"""Tile and region production: tile cache → source → transforms (iipsrv's order) → encoder."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from iipserver import display as vdisplay
from iipserver import transforms
from iipserver.cache import ByteLRU, EntryLRU
from iipserver.encoders import Encoded, encode
from iipserver.errors import BadRequest
from iipserver.sources.base import SourceInfo, composite
from iipserver.sources.pool import OpenedImage
from iipserver.view import Display, Rendering
from iipserver.viewport import Plan
from iipserver.watermark import Watermark

log = logging.getLogger(__name__)

#: Default of the memory one region request may use for its pixels (``MAX_REGION_MB``).
REGION_BUDGET = 256 * 1024 * 1024

#: Images whose histogram (CNT=eq|st, COL=binary) and background statistics are remembered.
IMAGES_KEPT = 1000

#: Tiles rendered with one chain before its lookup table is built. A table costs 15-370 ms of
#: CPU once and saves 140-630 µs per tile afterwards: built after 256 tiles, it never costs more
#: than about what computing those tiles directly did (a slider drag, or a VisiOmatic user
#: who changes the cuts every screen of 20-50 tiles, must not build one per setting).
TABLE_AFTER_USES = 256


@dataclass(frozen=True)
class Background:
    """VisiOmatic 3 background statistics of an image and the default cuts derived from them."""

    level: np.ndarray
    mad: np.ndarray
    cuts: np.ndarray
    """(channels, 2): min and max per channel."""


@dataclass(frozen=True)
class Histogram:
    """An image's 256-bin histogram (tile 0 of the smallest level) and its Otsu threshold."""

    counts: np.ndarray
    threshold: int


def tone_of(rendering: Rendering) -> transforms.Tone:
    """The per-value stages of a rendering (after CTW)."""
    return transforms.Tone(
        rendering.gamma,
        rendering.log_gamma,
        rendering.invert,
        rendering.colormap,
        rendering.contrast,
    )


def levels_of(info: SourceInfo, rendering: Rendering) -> transforms.Levels | None:
    """The rendering as one per-value chain from the stored values, when it is one."""
    if rendering.shade is not None or info.colorspace == "CIELAB" or not rendering.mins:
        return None
    if info.channels == 1:
        twist = None if rendering.twist is None else rendering.twist[:1]
        return transforms.Levels(rendering.mins[0], rendering.maxs[0], twist, tone_of(rendering))
    if (
        rendering.twist is None
        and rendering.colormap is None
        and len(set(rendering.mins)) == 1
        and len(set(rendering.maxs)) == 1
    ):
        return transforms.Levels(rendering.mins[0], rendering.maxs[0], None, tone_of(rendering))
    return None


Curve = transforms.Levels | transforms.Tone


def curve_of(info: SourceInfo, rendering: Rendering, dtype: np.dtype) -> Curve:
    """What a float table of this rendering tabulates: the whole chain from float32 values
    (``levels_of``), else the tone stages after CTW."""
    if dtype == np.float32:
        levels = levels_of(info, rendering)
        if levels is not None:
            return levels
    return tone_of(rendering)


def develop(
    tile: np.ndarray,
    info: SourceInfo,
    rendering: Rendering,
    use_table: bool = False,
    table: transforms.ToneTable | None = None,
) -> np.ndarray:
    """Raw pixels to 8-bit: CIELAB conversion, then the float pipeline when it applies.

    Order (spec §10): normalise → SHD → CTW → GAM/log → INV → CMP → contrast and quantise.
    With ``use_table``, same result through lookup tables: an exact per-value table for 8/16-bit
    stored values, and for float values ``table``, built for ``curve_of`` (none yet: direct).
    """
    if info.colorspace == "CIELAB" and tile.dtype == np.uint8:
        tile = transforms.lab_to_srgb(tile)
    if not rendering.needs_float(info):
        return tile
    levels = levels_of(info, rendering) if use_table else None
    if levels is not None and transforms.levels_supported(tile.dtype):
        if tile.dtype != np.float32:
            return transforms.apply_levels(tile, levels)
        if table is not None:
            return transforms.apply_levels(tile, levels, table)
        use_table = False
    data = transforms.normalise(tile, rendering.mins, rendering.maxs)
    if rendering.shade is not None:
        data = transforms.shade(data, *rendering.shade)
    if rendering.twist is not None:
        data = transforms.twist(data, rendering.twist)
    tone = tone_of(rendering)
    if use_table and table is not None:
        return transforms.apply_tone(data, tone, table)
    return tone.exact(data)


class Tables:
    """Float lookup tables, built in a background thread so that no request waits for one
    (30-400 ms each); until a table is ready, tiles are computed directly (same bytes)."""

    def __init__(self, kept: int = 16) -> None:
        self._built: EntryLRU[Curve, transforms.ToneTable] = EntryLRU(kept)
        self._pending: dict[Curve, Future[transforms.ToneTable]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def get(self, curve: Curve) -> transforms.ToneTable | None:
        """The table of ``curve`` if built; else start building it (at most two at a time).
        Safe to call from several request threads (``iipserver serve``)."""
        table = self._built.get(curve)
        if table is not None:
            return table
        with self._lock:
            future = self._pending.get(curve)
            if future is None:
                if len(self._pending) < 2:
                    if self._executor is None:  # created in the worker, after any fork
                        self._executor = ThreadPoolExecutor(1, thread_name_prefix="tables")
                    self._pending[curve] = self._executor.submit(build_table, curve)
                return None
            if not future.done():
                return None
            del self._pending[curve]
        try:
            table = future.result()
        except Exception:
            log.exception("building a lookup table failed")
            return None
        self._built.put(curve, table)
        return table

    def wait(self) -> None:
        """Let the tables being built finish (tests, benchmarks)."""
        for future in list(self._pending.values()):
            future.exception()

    def clear(self) -> None:
        """Forget every table (those being built are dropped when done)."""
        self._built.clear()
        with self._lock:
            self._pending.clear()


def build_table(curve: Curve) -> transforms.ToneTable:
    """The float table of ``curve`` (uncached: the pipeline keeps its own)."""
    if isinstance(curve, transforms.Levels):
        return transforms.levels_table.__wrapped__(curve)
    return transforms.tone_table.__wrapped__(curve)


def finish(
    pixels: np.ndarray, info: SourceInfo, rendering: Rendering, hist: Histogram | None
) -> np.ndarray:
    """8-bit pixels to output pixels: flatten → grey → binary → equalise → flip → rotate."""
    out = transforms.flatten(pixels)
    if rendering.colour in ("grey", "gray") and out.shape[2] == 3 and info.colorspace == "sRGB":
        out = transforms.greyscale(out)
    if rendering.colour == "binary" and hist is not None and info.colorspace != "BINARY":
        out = transforms.binarise(out, hist.threshold)
    if rendering.equalise and hist is not None:
        out = transforms.equalise(out, hist.counts)
    return transforms.orient(out, rendering.rotation, rendering.flip)


class Pipeline:
    """Produces encoded tiles and regions.

    ``cache_bytes`` is shared by two byte-bounded LRUs: decoded raw tiles (any rendering of a
    tile starts from them) and encoded output tiles (a repeated request is answered without
    decoding or encoding, as iipsrv's tile cache does for JPEG tiles). With ``passthrough``
    (CODEC_PASSTHROUGH) a stored JPEG tile requested without processing is sent as stored.
    """

    def __init__(
        self,
        cache_bytes: int,
        interpolation: int = 1,
        passthrough: bool = True,
        watermark: Watermark | None = None,
        region_budget: int = REGION_BUDGET,
    ) -> None:
        self.region_budget = region_budget
        self.raw_tiles: ByteLRU[np.ndarray] = ByteLRU(cache_bytes // 2)
        self.encoded_tiles: ByteLRU[bytes] = ByteLRU(cache_bytes - cache_bytes // 2)
        self.watermark = watermark
        self.passthrough = passthrough and watermark is None  # stored tiles carry no mark
        self.interpolation = interpolation
        self._histograms: EntryLRU[tuple[str, int, int], Histogram] = EntryLRU(IMAGES_KEPT)
        self._backgrounds: EntryLRU[tuple[str, int, int], Background] = EntryLRU(IMAGES_KEPT)
        self._tone_uses: EntryLRU[Curve, int] = EntryLRU(256)
        self.tables = Tables()

    def table_for(
        self, info: SourceInfo, rendering: Rendering, dtype: np.dtype
    ) -> tuple[bool, transforms.ToneTable | None]:
        """Count a use of the rendering's chain; once it has been used enough to be worth a
        table: (True, its float table, or None while it is being built)."""
        curve = curve_of(info, rendering, dtype)
        uses = (self._tone_uses.get(curve) or 0) + 1
        self._tone_uses.put(curve, uses)
        if uses < TABLE_AFTER_USES:
            return False, None
        direct = dtype != np.float32 and transforms.levels_supported(dtype)
        if direct and levels_of(info, rendering) is not None:
            return True, None  # develop uses an exact per-value table, built at once
        return True, self.tables.get(curve)

    def raw_tile(self, image: OpenedImage, resolution: int, index: int) -> np.ndarray:
        """Return a decoded tile from the cache or the source (uncompressed tiles are read
        again rather than cached: a read costs about what a cache entry saves)."""
        if image.source.stored_raw(resolution):
            return image.source.read_tile(resolution, index)
        key = (image.path, image.stamp.mtime_ns, image.stamp.size, resolution, index)
        tile = self.raw_tiles.get(key)
        if tile is None:
            tile = image.source.read_tile(resolution, index)
            self.raw_tiles.put(key, tile)
        return tile

    def raw_region(
        self,
        image: OpenedImage,
        resolution: int,
        x: int,
        y: int,
        width: int,
        height: int,
        budgeted: bool = True,
    ) -> np.ndarray:
        """Return a rectangle of one level composited from (cached) tiles of that level.

        Raises:
            BadRequest: with ``budgeted``, the rectangle needs more than ``region_budget``.
        """
        info = image.source.info
        needed = width * height * info.channels * np.dtype(info.dtype).itemsize
        if budgeted and needed > self.region_budget:
            raise BadRequest("requested region is too large for this server (MAX_REGION_MB)")
        return composite(
            info.levels[resolution],
            lambda index: self.raw_tile(image, resolution, index),
            (x, y, width, height),
            info.channels,
            info.dtype,
        )

    def histogram(self, image: OpenedImage) -> Histogram:
        """The image's histogram: tile 0 of the smallest level, >8-bit data quantised first."""
        key = (image.path, image.stamp.mtime_ns, image.stamp.size)
        found = self._histograms.get(key)
        if found is not None:
            return found
        info = image.source.info
        tile = self.raw_tile(image, 0, 0)
        if info.colorspace == "CIELAB" and tile.dtype == np.uint8:
            tile = transforms.lab_to_srgb(tile)
        elif tile.dtype != np.uint8:
            tile = transforms.quantise(transforms.normalise(tile, info.min_values, info.max_values))
        counts = transforms.histogram(tile)
        made = Histogram(counts, transforms.otsu(counts))
        self._histograms.put(key, made)
        return made

    def background(self, image: OpenedImage) -> Background:
        """Background level, MAD and default cuts (VisiOmatic 3's), from every 16th row of the
        full-resolution level counted from the bottom (FITS row 1); cached per file version.
        When those rows would not fit ``region_budget`` (very large images), the largest
        reduced level whose rows do is sampled instead. A source with a
        ``background_samples()`` method (FITS: single rows are cheap) gives its own samples.

        Raises:
            BadRequest: not even the smallest level fits.
        """
        key = (image.path, image.stamp.mtime_ns, image.stamp.size)
        found = self._backgrounds.get(key)
        if found is not None:
            return found
        info = image.source.info
        sampler = getattr(image.source, "background_samples", None)
        if sampler is not None:  # a source that reads single rows cheaply (FITS) samples itself
            planes = sampler()
            bg_level, mad = vdisplay.background(planes)
            made = Background(bg_level, mad, vdisplay.default_cuts(bg_level, mad))
            self._backgrounds.put(key, made)
            return made
        full = len(info.levels) - 1
        itemsize = max(np.dtype(info.dtype).itemsize, 4)  # samples become float32 or wider
        while True:  # the largest level whose sampled rows fit the region budget
            lv = info.levels[full]
            rows = -(-lv.height // 16)
            band = lv.width * lv.tile_height * info.channels * itemsize
            fits = max(band, lv.width * rows * info.channels * itemsize) <= self.region_budget
            if fits:
                break
            if full == 0:
                raise BadRequest("image too large for background statistics (MAX_REGION_MB)")
            full -= 1
        level = info.levels[full]
        wanted = np.arange(level.height - 1, -1, -16)[::-1]
        samples = []
        for top in range(0, level.height, level.tile_height):
            rows_here = wanted[(wanted >= top) & (wanted < top + level.tile_height)]
            if rows_here.size:
                band_pixels = self.raw_region(
                    image, full, 0, top, level.width, level.tile_height, budgeted=False
                )
                samples.append(band_pixels[rows_here - top])
        data = np.concatenate(samples)[::-1]  # FITS order: bottom row first
        planes = np.moveaxis(data, 2, 0).reshape(info.channels, -1)
        bg_level, mad = vdisplay.background(planes)
        made = Background(bg_level, mad, vdisplay.default_cuts(bg_level, mad))
        self._backgrounds.put(key, made)
        return made

    @staticmethod
    def display(tile: np.ndarray, settings: Display) -> np.ndarray:
        """VisiOmatic 3 rendering of a raw tile or region to 8-bit grey or RGB."""
        if settings.channel is not None:
            c = settings.channel - 1
            return vdisplay.mono(
                tile[:, :, c],
                settings.cuts[c],
                settings.brightness,
                settings.contrast,
                settings.gamma,
                settings.invert,
                settings.colormap,
            )
        return vdisplay.colour(
            tile,
            np.array(settings.cuts, dtype=np.float32),
            np.array(settings.matrix, dtype=np.float32),
            settings.brightness,
            settings.contrast,
            settings.gamma,
            settings.invert,
        )

    def _prepare(
        self, image: OpenedImage, rendering: Rendering, histogram_image: OpenedImage | None
    ) -> tuple[Rendering, Histogram | None]:
        needs = rendering.equalise or rendering.stretch or rendering.colour == "binary"
        hist = self.histogram(histogram_image or image) if needs else None
        if rendering.stretch and hist is not None:
            info = image.source.info
            lo, hi = transforms.stretch_range(
                hist.counts, info.bits_per_sample, info.sample_format != "float"
            )
            channels = info.channels
            rendering = replace(rendering, mins=(lo,) * channels, maxs=(hi,) * channels)
        return rendering, hist

    def tile(
        self,
        image: OpenedImage,
        resolution: int,
        index: int,
        rendering: Rendering,
        histogram_image: OpenedImage | None = None,
    ) -> Encoded:
        """Return tile ``index`` of ``resolution`` (0 = smallest) rendered and encoded.

        ``histogram_image`` is the image whose histogram CNT=eq|st and COL=binary use (by
        default ``image``; for image sequences iipsrv uses the view at horizontal angle 0).
        """
        info = image.source.info
        stamp = image.stamp
        key = (image.path, stamp.mtime_ns, stamp.size, resolution, index, rendering)
        media_type = rendering.fmt.media_type
        data = self.encoded_tiles.get(key)
        if data is not None:
            return Encoded(data, media_type)
        if self.passthrough and rendering.plain(info):
            data = image.source.stored_jpeg(resolution, index)
            if data is not None:
                self.encoded_tiles.put(key, data)
                return Encoded(data, media_type)
        started = time.perf_counter()
        raw = self.raw_tile(image, resolution, index)
        read = time.perf_counter()
        rendering, hist = self._prepare(image, rendering, histogram_image)
        use_table, table = False, None
        if rendering.needs_float(info):
            use_table, table = self.table_for(info, rendering, raw.dtype)
        pixels = finish(develop(raw, info, rendering, use_table, table), info, rendering, hist)
        if self.watermark is not None:
            pixels = self.watermark.apply(pixels, (image.path, resolution, index))
        processed = time.perf_counter()
        encoded = encode(pixels, rendering.fmt, rendering.quality)
        if hist is None:  # output that depends on an image histogram is not kept
            self.encoded_tiles.put(key, encoded.data)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "tile %s r=%d t=%d: read %.0f us, process %.0f us, encode %.0f us",
                image.path,
                resolution,
                index,
                (read - started) * 1e6,
                (processed - read) * 1e6,
                (time.perf_counter() - processed) * 1e6,
            )
        return encoded

    def region(
        self,
        image: OpenedImage,
        plan: Plan,
        rendering: Rendering,
        histogram_image: OpenedImage | None = None,
    ) -> Encoded:
        """Return a CVT region: the plan's level rectangle, resized to its output size."""
        if plan.out_width * plan.out_height * 3 > self.region_budget:
            raise BadRequest("CVT: requested output size is too large (MAX_REGION_MB)")
        info = image.source.info
        raw = self.raw_region(image, plan.resolution, plan.x, plan.y, plan.width, plan.height)
        rendering, hist = self._prepare(image, rendering, histogram_image)
        pixels = develop(raw, info, rendering)
        if (pixels.shape[1], pixels.shape[0]) != (plan.out_width, plan.out_height):
            if self.interpolation == 0:
                pixels = transforms.resize_nearest(pixels, plan.out_width, plan.out_height)
            else:
                pixels = transforms.resize_bilinear(pixels, plan.out_width, plan.out_height)
        pixels = finish(pixels, info, rendering, hist)
        pixels = self.mark_region(image, pixels, (plan.resolution, plan.x, plan.y))
        return encode(pixels, rendering.fmt, rendering.quality)

    def mark_region(self, image: OpenedImage, pixels: np.ndarray, where: Hashable) -> np.ndarray:
        """Watermark output ``pixels`` of a region of ``image``: one draw per block of twice
        the tile size (spec §17, mainline)."""
        if self.watermark is None:
            return pixels
        level = image.source.info.levels[-1]
        block = 2 * max(level.tile_width, level.tile_height)
        return self.watermark.apply_blocks(pixels, block, (image.path, where, pixels.shape))

    def clear(self) -> None:
        """Empty the tile caches and the histograms."""
        self.raw_tiles.clear()
        self.encoded_tiles.clear()
        self.tables.clear()
        self._histograms.clear()
        self._tone_uses.clear()
        self._backgrounds.clear()
