"""dataprep: raw image sets (GeoTIFF/PNG/JPEG/NPY + a manifest) -> sharded Zarr v3 stores + Parquet index.

Entry point: `python -m dataprep {sample,convert,verify,inspect,bench,bench-read,bench-scale}`;
layout: docs/dataprep.md.
The trainer reads datasets (local folders, s3:// or gs://bucket/prefix) through `dataprep.reader.DatasetReader`
(tensorstore underneath: dataprep.tsio, dataprep.remote).
"""

from .reader import DatasetReader

__all__ = ["DatasetReader"]
