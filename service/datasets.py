"""Uploaded datasets: stored under FINETUNE_SERVE_HOME/datasets by an id we choose, validated on upload.

The user's file name only chooses the format (by its suffix); it never becomes part of a path.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from finetune_core.data import FORMATS, read_table
from finetune_core.errors import DataError, FinetuneError

MAX_UPLOAD_ENV = "FINETUNE_SERVE_MAX_UPLOAD_MB"
DEFAULT_MAX_UPLOAD_MB = 100
_ID = re.compile(r"ds-[0-9a-f]{16}")


class TooLarge(FinetuneError):
    """An upload over the size limit (the service answers 413)."""


class UnknownDataset(FinetuneError):
    """A dataset id that was never uploaded."""


@dataclass(frozen=True)
class DatasetInfo:
    id: str
    rows: int
    columns: list[str]
    format: str
    bytes: int

    def public(self) -> dict:
        return {"id": self.id, "rows": self.rows, "columns": self.columns, "format": self.format, "bytes": self.bytes}


def max_upload_bytes() -> int:
    return int(float(os.environ.get(MAX_UPLOAD_ENV, DEFAULT_MAX_UPLOAD_MB)) * 1024 * 1024)


def datasets_dir() -> Path:
    from finetune_core.registry import root

    return root() / "datasets"


def format_of(filename: str | None) -> str:
    suffix = Path(filename or "").suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"file: cannot tell the format of '{filename}'; name it with one of {', '.join(sorted(FORMATS))}")
    return suffix


async def save_upload(filename: str | None, chunks: AsyncIterator[bytes], limit: int) -> DatasetInfo:
    """Write the upload in chunks (refusing it once over `limit` bytes), validate it, record it."""
    suffix = format_of(filename)
    folder = datasets_dir()
    folder.mkdir(parents=True, exist_ok=True)
    dataset_id = "ds-" + uuid.uuid4().hex[:16]
    partial = folder / f".{dataset_id}.part{suffix}"  # read_table picks the format by the last suffix
    size = 0
    try:
        with partial.open("wb") as f:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"file: larger than the upload limit of {limit / 2**20:g} MiB "
                                   f"(set {MAX_UPLOAD_ENV} to raise it)")
                f.write(chunk)
        try:
            rows, columns = read_table(partial, "uploaded")
        except DataError as err:
            raise DataError(str(err).replace(str(partial), str(filename))) from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    final = folder / f"{dataset_id}{suffix}"
    os.replace(partial, final)
    info = DatasetInfo(dataset_id, len(rows), sorted(columns), FORMATS[suffix], size)
    (folder / f"{dataset_id}.json").write_text(json.dumps({**info.public(), "file": final.name, "filename": filename}))
    return info


def path_of(dataset_id: str, field: str) -> Path:
    """The stored file of an uploaded dataset; `field` names the request field in the error."""
    if not isinstance(dataset_id, str) or not _ID.fullmatch(dataset_id):
        raise UnknownDataset(f"{field}: '{str(dataset_id)[:80]}' is not a dataset id (like ds-0123456789abcdef); "
                             "upload the file with POST /datasets first")
    record = datasets_dir() / f"{dataset_id}.json"
    if not record.is_file():
        raise UnknownDataset(f"{field}: no dataset '{dataset_id}'; upload the file with POST /datasets first")
    return datasets_dir() / json.loads(record.read_text())["file"]
