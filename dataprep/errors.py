"""Reject reasons: every manifest row that is not converted ends in errors.parquet with one of these kinds."""

from __future__ import annotations

# Machine-readable kinds (the `kind` column of errors.parquet); messages name the file and the problem.
KINDS = (
    "malformed_row",  # manifest line that is not valid JSON/CSV, or a field of the wrong type
    "missing_field",  # id, lon or lat absent
    "duplicate_id",  # id seen earlier in the manifest (the first occurrence is kept)
    "lonlat_out_of_range",
    "bad_date",  # unparseable frame date
    "duplicate_date",  # two frames of one modality on the same day
    "empty_set",  # no HR, no S2, no S1
    "path_escapes_root",  # a path resolving outside --root
    "missing_file",
    "corrupt_file",  # unreadable or truncated image/array
    "wrong_band_count",
    "wrong_size",  # frame/image size differs from the dataset's size, or bands of one frame disagree
    "wrong_dtype",
    "nan_inf",
    "value_out_of_range",  # e.g. negative or > 65535 reflectance that cannot be stored as uint16
)


class Reject(Exception):  # noqa: N818 - a verdict on a row, not a program error
    """A row cannot be converted: `kind` is one of KINDS, the message names the file and the problem."""

    def __init__(self, kind: str, message: str, path: str | None = None):
        assert kind in KINDS, kind
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.path = path or ""
        self.row = -1  # manifest row, set by the planner
        self.id = ""

    def __reduce__(self):  # keep kind/row/id across process boundaries
        return (_rebuild, (self.kind, self.message, self.path, self.row, self.id))


def _rebuild(kind: str, message: str, path: str, row: int, sid: str) -> Reject:
    r = Reject(kind, message, path)
    r.row, r.id = row, sid
    return r


class ChecksumError(ValueError):
    """A stored chunk or shard index whose crc32c does not match its bytes, or whose bytes do not decode."""
