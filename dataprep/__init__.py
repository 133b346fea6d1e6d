"""dataprep: raw image sets (GeoTIFF/PNG/JPEG/NPY + a manifest) -> sharded Zarr v3 stores + Parquet index.

Entry point: `python -m dataprep {sample,convert,verify,inspect,bench}`; layout: docs/dataprep.md.
The trainer reads datasets through `dataprep.reader.DatasetReader`.
"""

from .reader import DatasetReader

__all__ = ["DatasetReader"]
