"""Read labelled tables as people have them: JSONL, a JSON array, CSV/TSV (any common delimiter), Parquet.

A leaf module (no torch): the text reader (data.py), the image-list reader (images.py), the CLI and
the service's POST /datasets all read files through `read_table`, so a file accepted by one is
accepted by all. Errors are DataErrors that name the file, the line and what to do.

What real files do that this handles:
- "CSV UTF-8" from Excel starts with a byte-order mark; read naively, the first column is named
  '\\ufeffreview' and `--text-column review` fails with an invisible character in the error.
- Where the comma is the decimal separator, CSV files use ';'. The delimiter of a .csv file is
  sniffed among , ; TAB and | from its header line.
- A .json file is either one object per line (JSONL) or one array of objects.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

from .errors import DataError

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
DELIMITERS = (",", ";", "\t", "|")
_DELIMITER_NAMES = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}


def read_examples(path: str | Path, text_column: str = "text", label_column: str = "label",
                  role: str = "data") -> tuple[list, list]:
    """(inputs, raw labels) from two columns of a table; raw labels keep their file type."""
    rows, columns = read_table(path, role)
    for column, what in ((text_column, "text"), (label_column, "label")):
        if column not in columns:
            raise DataError(
                f"{role} file '{path}': {what} column '{column}' not found; columns are "
                f"{', '.join(sorted(columns)) or 'none'} (set --{what}-column)"
            )
    return [r.get(text_column) for r in rows], [r.get(label_column) for r in rows]


def read_table(path: str | Path, role: str = "data") -> tuple[list[dict], set[str]]:
    """Rows as dicts and the union of their columns."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{role} file '{path}' does not exist")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{role} file '{path}': unknown format '{path.suffix}'; use one of {', '.join(sorted(FORMATS))}")
    if kind == "parquet":
        rows = _read_parquet(path, role)
    else:
        try:
            text = path.read_text(encoding="utf-8-sig")  # utf-8-sig drops a leading byte-order mark
        except UnicodeDecodeError as err:
            raise DataError(f"{role} file '{path}' is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
        if kind == "json":
            rows = _read_json(text, path, role)
        elif kind == "jsonl":
            rows = _read_jsonl(text, path, role)
        else:
            rows = _read_csv(text, path, role, "\t" if kind == "tsv" else None)
    if not rows:
        raise DataError(f"{role} file '{path}' has no rows")
    columns: set[str] = set()
    for r in rows:
        columns.update(r)
    return rows, columns


def sniff_delimiter(header: str) -> str:
    """The delimiter that splits the header line into the most fields (a comma on a tie or none)."""
    counts = {d: header.count(d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: counts[d])  # max keeps the first on a tie: the comma
    return best if counts[best] else ","


def _read_csv(text: str, path: Path, role: str, delimiter: str | None) -> list[dict]:
    header = io.StringIO(text, newline="").readline()
    delimiter = delimiter or sniff_delimiter(header)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        rows = []
        for row in reader:
            if None in row:  # more fields than the header names: a delimiter or quoting problem
                raise DataError(
                    f"{role} file '{path}' line {reader.line_num}: {len(row) - 1 + len(row[None])} fields, but the "
                    f"header has {len(reader.fieldnames)} ({_DELIMITER_NAMES[delimiter]}-separated); quote fields "
                    f"that contain the delimiter"
                )
            rows.append(row)
    except csv.Error as err:
        raise DataError(f"{role} file '{path}' is not valid CSV ({_DELIMITER_NAMES[delimiter]}-separated): {err}") from None
    return rows


def _read_jsonl(text: str, path: Path, role: str) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{role} file '{path}' line {number} is not valid JSON ({err.msg}); "
                            "expected one object per line") from None
        if not isinstance(row, dict):
            raise DataError(f"{role} file '{path}' line {number} is a JSON {_json_kind(row)}, expected an object")
        rows.append(row)
    return rows


def _read_json(text: str, path: Path, role: str) -> list[dict]:
    """A .json file: an array of objects, or JSON Lines under a .json name."""
    if not text.lstrip().startswith("["):
        return _read_jsonl(text, path, role)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{role} file '{path}' line {err.lineno} is not valid JSON ({err.msg}); "
                        "expected an array of objects or one object per line") from None
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(f"{role} file '{path}': item {number} of the array is a JSON {_json_kind(row)}, expected an object")
    return rows


def _json_kind(value) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}.get(type(value), "value")


def _read_parquet(path: Path, role: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{role} file '{path}': reading Parquet needs the 'pyarrow' package (pip install pyarrow)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{role} file '{path}' is not readable Parquet: {err}") from None


# ---------------------------------------------------------------- labels


def is_missing_label(label) -> bool:
    return label is None or (isinstance(label, str) and not label.strip()) or (isinstance(label, float) and math.isnan(label))


def label_key(label) -> str:
    return str(label).strip()


def label_names(labels: list) -> list[str]:
    """Sorted label names: numerically when every label is a whole number, else as text."""
    keys = {label_key(x) for x in labels}
    if all(re.fullmatch(r"-?\d+", k) for k in keys):
        return sorted(keys, key=int)
    return sorted(keys)


def encode_labels(labels: list, names: list[str], role: str = "data") -> list[int]:
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for row, label in enumerate(labels, 1):
        key = label_key(label)
        if key not in index:
            raise DataError(f"{role} row {row}: label '{key}' does not occur in the training data; known labels: {', '.join(names)}")
        ids.append(index[key])
    return ids


def regression_targets(labels: list, role: str = "data") -> list[float]:
    targets = []
    for row, label in enumerate(labels, 1):
        try:
            value = float(label)
        except (TypeError, ValueError):
            raise DataError(f"{role} row {row}: regression target {label!r} is not a number") from None
        if not math.isfinite(value):
            raise DataError(f"{role} row {row}: regression target {label!r} is not a finite number")
        targets.append(value)
    return targets
