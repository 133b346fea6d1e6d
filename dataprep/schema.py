"""Constants of the dataset layout: schema version, band orders, date and region conventions."""

from __future__ import annotations

import datetime as _dt
import math

import numpy as np

SCHEMA_VERSION = 1

HR_BANDS = ("R", "G", "B")
S2_BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
S1_BANDS = ("VV", "VH")

# Band layouts of common Sentinel-2 products, by source band name; frames are reordered to S2_BANDS.
S2_LAYOUTS: dict[str, tuple[str, ...]] = {
    "skysense10": S2_BANDS,
    # ESA L1C order (13 bands) and L2A order (12, no cirrus B10): TerraMind/TerraMesh, most GeoTIFF exports.
    "l1c13": ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"),
    "l2a12": ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12"),
    # EuroSAT's 13-band tifs put B8A last (checked on the data: band 12 correlates 0.88 with B8).
    "eurosat13": ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B9", "B10", "B11", "B12", "B8A"),
}
# Layout guessed from the band count when the manifest does not name one.
DEFAULT_LAYOUT_BY_COUNT = {10: "skysense10", 12: "l2a12", 13: "l1c13"}

MODALITIES = ("hr", "s2", "s1")
DTYPES = {"hr": np.dtype("uint8"), "s2": np.dtype("uint16"), "s1": np.dtype("float32"), "osm": np.dtype("uint8")}
N_BANDS = {"hr": 3, "s2": len(S2_BANDS), "s1": len(S1_BANDS)}
OSM_UNKNOWN = 255  # placeholder label value for sets without an OSM raster

EPOCH = _dt.date(1970, 1, 1)


def normalise_band_name(name: str) -> str:
    """'B02' -> 'B2', 'b8a' -> 'B8A', 'B08A' -> 'B8A'."""
    n = name.strip().upper()
    if n.startswith("B"):
        rest = n[1:].lstrip("0") or "0"
        return "B" + rest
    return n


def parse_date(value) -> int:
    """A date (ISO string 'YYYY-MM-DD[Thh:mm:ss]', 'YYYYMMDD', or int days since 1970-01-01) -> days since epoch.

    Raises ValueError when the value cannot be read as a date.
    """
    if isinstance(value, bool) or value is None:
        raise ValueError(f"not a date: {value!r}")
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, _dt.datetime):
        return (value.date() - EPOCH).days
    if isinstance(value, _dt.date):
        return (value - EPOCH).days
    if isinstance(value, str):
        s = value.strip()
        try:
            if len(s) > 10:
                return (_dt.datetime.fromisoformat(s.replace("Z", "+00:00")).date() - EPOCH).days
            return (_dt.date.fromisoformat(s) - EPOCH).days
        except ValueError:
            raise ValueError(f"unparseable date {value!r}") from None
    raise ValueError(f"not a date: {value!r}")


def days_to_iso(days: int) -> str:
    return (EPOCH + _dt.timedelta(days=int(days))).isoformat()


# Region grid: latitude bands of REGION_DEG degrees; each band is cut into round(360 cos(lat_mid) / REGION_DEG)
# longitude cells (at least 1), so every cell covers roughly REGION_DEG x REGION_DEG degrees at the equator's
# scale, i.e. about the same area (~1.2e6 km^2 for 10 degrees). Ids run south to north, west to east.
REGION_DEG = 10.0


def _region_table(deg: float) -> tuple[np.ndarray, np.ndarray]:
    n_bands = int(round(180.0 / deg))
    mids = -90.0 + (np.arange(n_bands) + 0.5) * deg
    cells = np.maximum(1, np.round(360.0 * np.cos(np.radians(mids)) / deg)).astype(np.int64)
    first = np.concatenate([[0], np.cumsum(cells)[:-1]])
    return cells, first


def region_of(lon, lat, deg: float = REGION_DEG) -> np.ndarray:
    """Equal-area-ish region id of each (lon, lat): (N,) float -> (N,) int64."""
    lon = np.asarray(lon, dtype=np.float64)
    lat = np.asarray(lat, dtype=np.float64)
    cells, first = _region_table(deg)
    band = np.clip(np.floor((lat + 90.0) / deg).astype(np.int64), 0, len(cells) - 1)
    n = cells[band]
    frac = (np.mod(lon + 180.0, 360.0)) / 360.0
    cell = np.minimum((frac * n).astype(np.int64), n - 1)
    return first[band] + cell


def n_regions(deg: float = REGION_DEG) -> int:
    cells, _ = _region_table(deg)
    return int(cells.sum())


def check_lonlat(lon, lat) -> None:
    if not (math.isfinite(lon) and -180.0 <= lon <= 180.0):
        raise ValueError(f"lon {lon} out of range [-180, 180]")
    if not (math.isfinite(lat) and -90.0 <= lat <= 90.0):
        raise ValueError(f"lat {lat} out of range [-90, 90]")
