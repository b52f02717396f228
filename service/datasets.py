"""Uploaded datasets: stored under FINETUNE_SERVE_HOME/datasets by an id we choose, validated on upload.

A table (JSONL, CSV, TSV, Parquet) is stored as one file, `datasets/<id><suffix>`. A zip of images
is extracted into its own folder, `datasets/<id>/`, and holds either the folder layout
(`train/<class>/*.png`, optional `val/` or `validation/` and `test/`, or just `<class>/*.png`),
optionally under one top folder, or one JSONL/CSV list of image paths and labels beside its images.
Every image is decoded once on upload: the answer counts images per split and class and names the
unreadable ones (training skips them too). Saving blocks for seconds, so the route calls save_upload
from a thread-pool thread, never on the event loop; a large table is read in a child process
(service.table_shape), which shares no GIL with the worker.

An upload is written to temporaries named by its id (`.ds-<id>.part.<suffix>`, `.ds-<id>.part/`),
renamed into place when valid. A worker killed mid-upload leaves them behind: every upload first
removes those older than STALE_PARTIAL_SECONDS.

The user's file name only chooses the format (by its suffix); it never becomes part of a path.
Names inside a zip become paths only after checks: no absolute paths, no `..`, no links or special
files, at most FINETUNE_SERVE_MAX_ZIP_ENTRIES entries and FINETUNE_SERVE_MAX_EXTRACTED_MB in all,
and no entry that expands suspiciously (a zip bomb). `__MACOSX/` and dotfiles are skipped.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import time
import uuid
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from finetune_core import images
from finetune_core.errors import DataError, FinetuneError
from finetune_core.registry import disk_full
from finetune_core.tables import FORMATS, read_table

from . import table_shape
from .settings import env_name, settings

log = logging.getLogger("service.datasets")

# Images barely compress (PNG, JPEG: 1-3x) and JSONL/CSV lists 5-20x; a zip bomb expands 1000x and more.
MAX_COMPRESSION_RATIO = 100
# Entries smaller than this are not judged by their ratio (a tiny blank PNG compresses well); the total limit holds them.
RATIO_CHECK_BYTES = 1 << 20
ZIP = ".zip"
TABLE, IMAGE_FOLDER, IMAGE_LIST = "table", "image-folder", "image-list"
IMAGE_KINDS = (IMAGE_FOLDER, IMAGE_LIST)
DEFAULT_COLUMNS = {"image_column": "image", "label_column": "label"}
# Label counts reported for an image list with at most this many distinct labels.
MAX_REPORTED_LABELS = 1000
_ID = re.compile(r"ds-[0-9a-f]{16}")
# Tables larger than this are read in a child process, which costs ~0.3 s to start. In a thread, 4 MiB of CSV
# read in 0.65 s on 2 busy cores, ~100 ms of it in C calls that hold the GIL (decoding 16 ms, two StringIO
# copies 43 ms each), so the event loop stalls that long; at 1 MiB, ~25 ms.
CHILD_PARSE_BYTES = 1 << 20
# 100 MB of CSV reads in ~5 s on 2 shared cores: a child that takes 100 times that is stuck.
CHILD_PARSE_TIMEOUT_SECONDS = 600
# What an upload's temporaries are named (`.ds-<id>.part.csv`, `.ds-<id>.part/`): the id is a uuid's, never a pid.
PARTIAL_GLOB = ".ds-*.part*"
# An upload lives seconds to minutes: a 2 GiB zip of 100,000 small images decodes at ~1-10 ms an image.
# Temporaries this much older than their last write were left by a killed worker (several share the folder).
STALE_PARTIAL_SECONDS = 3600


class TooLarge(FinetuneError):
    """An upload over the size limit (the service answers 413)."""


class OutOfSpace(FinetuneError):
    """The disk holding the datasets folder is full (answered 507); nothing of the upload is kept."""


class UnknownDataset(FinetuneError):
    """A dataset id that was never uploaded."""


class UnsafeArchive(DataError):
    """A zip refused for what it holds (traversal, links, a bomb), not for being malformed."""

    field = "file"


@dataclass(frozen=True)
class DatasetInfo:
    """What POST /datasets answers; `extra` holds an image dataset's counts."""

    id: str
    rows: int  # table rows, or readable images
    columns: list[str]
    format: str
    bytes: int
    kind: str = TABLE
    extra: dict = field(default_factory=dict)

    def public(self) -> dict:
        return {"id": self.id, "kind": self.kind, "rows": self.rows, "columns": self.columns, "format": self.format,
                "bytes": self.bytes, **self.extra}


@dataclass(frozen=True)
class Stored:
    """An uploaded dataset as jobs and /evaluate use it."""

    id: str
    kind: str  # TABLE, IMAGE_FOLDER or IMAGE_LIST
    path: Path  # the table, the extracted dataset root (or class folder), or the image list
    folder: Path | None  # image datasets: everything extracted from the zip (image lists' paths stay inside)
    splits: dict[str, Path]  # image folders: the split folders found (train; validation, test when present)
    columns: dict[str, str]  # image lists: {"image_column", "label_column"} the upload was checked with

    def column(self, name: str, given: str | None) -> str:
        """A request's image_column / label_column, else the one an image list was checked with, else the default."""
        if given:
            return given
        return self.columns[name] if name in self.columns else DEFAULT_COLUMNS[name]

    def held_out(self, role: str) -> Path:
        """What a `validation` / `test` request field or /evaluate reads: that split, else test, validation, train."""
        if self.kind != IMAGE_FOLDER:
            return self.path
        for name in (role, "test", "validation", "train"):
            if name in self.splits:
                return self.splits[name]
        return self.path


def too_large() -> TooLarge:
    """The upload over FINETUNE_SERVE_MAX_UPLOAD_MB, whether the guard or save_upload finds it."""
    return TooLarge(f"file: larger than the upload limit of {settings().max_upload_mb:g} MiB "
                    f"(set {env_name('max_upload_mb')} to raise it)")


def datasets_dir() -> Path:
    from finetune_core.registry import root

    return root() / "datasets"


def format_of(filename: str | None) -> str:
    suffix = Path(filename or "").suffix.lower()
    if suffix not in FORMATS and suffix != ZIP:
        raise DataError(f"file: cannot tell the format of '{filename}'; name it with one of "
                        f"{', '.join(sorted([*FORMATS, ZIP]))} (.zip: images)")
    return suffix


def save_upload(filename: str | None, chunks: Iterable[bytes], image_column: str = "image",
                label_column: str = "label") -> DatasetInfo:
    """Write the upload in chunks (refusing it once over the upload limit), validate it, record it.

    A zip is extracted and its images checked; image_column and label_column name the columns of
    an image list inside it. Blocking (writing, parsing, decoding): call it from a thread. On a full
    disk, OutOfSpace, with nothing of the upload left behind.
    """
    try:
        return _save(filename, chunks, image_column, label_column)
    except OSError as err:
        reason = disk_full(err)
        if reason is None:
            raise
        raise OutOfSpace(f"file: the server's disk is full ({reason}); nothing was stored. Free space under "
                         f"{datasets_dir()} or upload a smaller file") from None


def _save(filename: str | None, chunks: Iterable[bytes], image_column: str, label_column: str) -> DatasetInfo:
    suffix = format_of(filename)
    folder = datasets_dir()
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_partials()
    dataset_id = "ds-" + uuid.uuid4().hex[:16]
    partial = folder / f".{dataset_id}.part{suffix}"  # read_table picks the format by the last suffix
    size, limit = 0, settings().max_upload_bytes
    try:
        with partial.open("wb") as f:
            for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise too_large()
                f.write(chunk)
        if suffix == ZIP:
            try:
                return _save_zip(partial, dataset_id, filename, size, image_column, label_column)
            finally:
                partial.unlink(missing_ok=True)  # extracted or refused: the archive itself is not kept
        try:
            rows, columns = _table_shape(partial, size)
        except DataError as err:  # the upload's own fault: it names the form field
            raise DataError(f"file: {str(err).replace(str(partial), str(filename))}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    final = folder / f"{dataset_id}{suffix}"
    os.replace(partial, final)
    info = DatasetInfo(dataset_id, rows, columns, FORMATS[suffix], size)
    try:
        _record(dataset_id, {**info.public(), "file": final.name, "filename": filename})
    except BaseException:  # a dataset without its record is no dataset
        final.unlink(missing_ok=True)
        raise
    return info


def _table_shape(path: Path, size: int) -> tuple[int, list[str]]:
    """(rows, sorted columns): a large table is read in a child process (service.table_shape says why)."""
    if size > CHILD_PARSE_BYTES:
        return table_shape.shape_in_child(path, "uploaded", CHILD_PARSE_TIMEOUT_SECONDS)
    rows, columns = read_table(path, "uploaded")
    return len(rows), sorted(columns)


def remove_stale_partials(max_age: float = STALE_PARTIAL_SECONDS) -> list[str]:
    """Remove upload temporaries last written over max_age seconds ago (a killed upload's); returns their names.

    Judged by age, not by owner: other workers' and pods' uploads in progress share the folder.
    """
    cutoff = time.time() - max_age
    removed = []
    for path in datasets_dir().glob(PARTIAL_GLOB):
        try:
            if path.lstat().st_mtime >= cutoff:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # another worker's sweep got there first
            continue
        except OSError as err:  # the upload that swept goes on; the next one tries again
            log.warning("could not remove the stale upload temporary %s (%s)", path, err)
            continue
        removed.append(path.name)
    if removed:
        log.info("removed %d stale upload temporaries: %s", len(removed), ", ".join(removed[:10]))
    return removed


def lookup(dataset_id: str, field: str) -> Stored:
    """An uploaded dataset by id; `field` names the request field in the error."""
    if not isinstance(dataset_id, str) or not _ID.fullmatch(dataset_id):
        raise UnknownDataset(f"{field}: '{str(dataset_id)[:80]}' is not a dataset id (like ds-0123456789abcdef); "
                             "upload the file with POST /datasets first")
    path = datasets_dir() / f"{dataset_id}.json"
    if not path.is_file():
        raise UnknownDataset(f"{field}: no dataset '{dataset_id}'; upload the file with POST /datasets first")
    record = json.loads(path.read_text())
    base = datasets_dir()
    if "stored" not in record:  # a table (records written before zips were accepted have no kind either)
        return Stored(dataset_id, TABLE, base / record["file"], None, {}, {})
    stored = record["stored"]
    return Stored(dataset_id, record["kind"], base / stored["path"], base / stored["folder"],
                  {role: base / p for role, p in stored["splits"].items()}, stored["columns"])


def _record(dataset_id: str, record: dict) -> None:
    """Write the record whole or not at all: a half-written one (a full disk) would break lookup."""
    scratch = datasets_dir() / f".{dataset_id}.part.json"
    try:
        scratch.write_text(json.dumps(record))
        os.replace(scratch, datasets_dir() / f"{dataset_id}.json")
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- zips of images


def _save_zip(archive: Path, dataset_id: str, filename: str | None, size: int, image_column: str,
              label_column: str) -> DatasetInfo:
    """Extract into datasets/<id>/, find the layout, decode every image once, record what was found."""
    folder = datasets_dir().resolve()  # the core resolves image paths: compare like with like
    partial = folder / f".{dataset_id}.part"
    try:
        extract_zip(archive, partial)
        base = dataset_base(partial)
        kind, path, extra, stored = describe_images(base, partial, image_column, label_column)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    os.replace(partial, folder / dataset_id)

    def relative(p: Path) -> str:
        return (Path(dataset_id) / p.relative_to(partial)).as_posix()

    info = DatasetInfo(dataset_id, extra.pop("rows"), extra.pop("columns"), "zip", size, kind, extra)
    try:
        _record(dataset_id, {**info.public(), "filename": filename, "stored": {
            "path": relative(path), "folder": dataset_id,
            "splits": {role: relative(p) for role, p in stored["splits"].items()}, "columns": stored["columns"]}})
    except BaseException:  # a dataset without its record is no dataset
        shutil.rmtree(folder / dataset_id, ignore_errors=True)
        raise
    return info


def extract_zip(archive: Path, target: Path) -> int:
    """Extract the zip's regular files into `target` (a new folder) after checking every entry; returns how many."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as err:
        raise DataError(f"file: not a readable zip archive ({err})") from None
    with zf:
        entries, limits = zf.infolist(), settings()
        if len(entries) > limits.max_zip_entries:
            raise UnsafeArchive(f"file: the zip holds {len(entries)} entries; at most {limits.max_zip_entries} are "
                                f"accepted (set {env_name('max_zip_entries')} to raise it)")
        budget = limits.max_extracted_bytes
        declared = sum(entry.file_size for entry in entries)
        if declared > budget:
            raise UnsafeArchive(f"file: the zip expands to {declared / 2**20:.1f} MiB; at most {budget / 2**20:g} MiB "
                                f"are accepted (set {env_name('max_extracted_mb')} to raise it)")
        chosen, seen = [], set()
        for entry in entries:
            parts = entry_parts(entry)
            if parts is None:
                continue
            if parts in seen:
                raise DataError(f"file: the zip holds '{entry.filename[:200]}' twice")
            seen.add(parts)
            chosen.append((entry, parts))
        target.mkdir()
        written = files = 0
        for entry, parts in chosen:
            destination = target.joinpath(*parts)
            try:
                if entry.is_dir():
                    destination.mkdir(parents=True, exist_ok=True)
                    continue
                destination.parent.mkdir(parents=True, exist_ok=True)
                out = destination.open("xb")  # never follows or overwrites anything
            except OSError as err:
                if disk_full(err):
                    raise  # the server's fault, not the zip's: save_upload answers it as OutOfSpace (507)
                raise DataError(f"file: entry '{entry.filename[:200]}' cannot be written as a file ({err.strerror}); "
                                "does another entry have the same name?") from None
            with out:
                try:
                    with zf.open(entry) as source:
                        while chunk := source.read(1 << 20):
                            written += len(chunk)
                            if written > budget:  # sizes in the zip's directory can lie; the bytes cannot
                                raise UnsafeArchive(f"file: the zip expands past {budget / 2**20:g} MiB "
                                                    f"(set {env_name('max_extracted_mb')} to raise it)")
                            out.write(chunk)
                except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, zlib.error) as err:
                    raise DataError(f"file: entry '{entry.filename[:200]}' cannot be extracted ({err})") from None
            files += 1
    return files


def entry_parts(entry: zipfile.ZipInfo) -> tuple[str, ...] | None:
    """The entry's path as safe parts, None for an entry to skip; UnsafeArchive for one to refuse."""
    name = entry.filename
    shown = name[:200]
    if name.startswith("/") or "\\" in name or "\x00" in name or re.match(r"[A-Za-z]:", name):
        raise UnsafeArchive(f"file: entry '{shown}' has an absolute or non-portable path; zip the dataset folder "
                            "with relative paths")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise UnsafeArchive(f"file: entry '{shown}' points outside the archive ('..'); zip the dataset folder itself")
    kind = stat.S_IFMT(entry.external_attr >> 16)  # the Unix file type, where the zip was made on Unix
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        what = "a symbolic link" if kind == stat.S_IFLNK else "a special file"
        raise UnsafeArchive(f"file: entry '{shown}' is {what}; only regular files and folders are accepted")
    if not parts or parts[0] == "__MACOSX" or any(part.startswith(".") for part in parts):
        return None  # macOS resource forks, .DS_Store, hidden files and folders
    if entry.flag_bits & 0x1:
        raise DataError(f"file: entry '{shown}' is encrypted; upload a zip without a password")
    if entry.file_size > RATIO_CHECK_BYTES and entry.file_size > MAX_COMPRESSION_RATIO * max(entry.compress_size, 1):
        raise UnsafeArchive(f"file: entry '{shown}' expands {entry.file_size / max(entry.compress_size, 1):.0f} times "
                            f"({entry.file_size / 2**20:.1f} MiB); refused as a likely zip bomb "
                            f"(at most {MAX_COMPRESSION_RATIO} times)")
    return parts


def dataset_base(root: Path) -> Path:
    """The dataset inside the extracted folder: the folder itself, or its one top folder."""
    children = list(root.iterdir())
    if len(children) == 1 and children[0].is_dir() and not _has_images(children[0]):
        return children[0]
    return root


def describe_images(base: Path, root: Path, image_column: str, label_column: str) -> tuple[str, Path, dict, dict]:
    """(kind, the path jobs read, the upload's answer, what to store) for an extracted image dataset."""
    lists = sorted(p for p in base.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)
    try:
        if len(lists) > 1:
            names = ", ".join(p.name for p in lists[:5])
            raise DataError(f"the zip holds {len(lists)} lists ({names}); put one image list per zip")
        if lists:
            return _describe_list(lists[0], root, image_column, label_column)
        return _describe_folder(base, root)
    except DataError as err:  # the core's messages name our folders: name the paths inside the zip instead
        message = str(err).replace(f"{root}/", "").replace(str(root), ".")
        raise DataError(message if message.startswith(("image_column:", "label_column:")) else f"file: {message}") from None


def _describe_folder(base: Path, root: Path) -> tuple[str, Path, dict, dict]:
    splits = {role: Path(p) for role, p in images.layout(str(base), None, None).items()}
    summary, unreadable, labels, total = {}, [], set(), 0
    for role, folder in splits.items():
        kept, kept_labels, report = images.read_images(folder, role)
        summary[role] = {"images": len(kept), "classes": dict(sorted(Counter(kept_labels).items())),
                         "dropped": report["dropped"]}
        unreadable += report.get("bad_images", [])
        labels.update(kept_labels)
        total += len(kept)
    if not total:
        raise DataError("no readable images in the zip")
    extra = {"rows": total, "columns": [], "labels": sorted(labels), "splits": summary,
             "unreadable": _relative_files(unreadable, root)}
    return IMAGE_FOLDER, base, extra, {"splits": splits, "columns": {}}


def _describe_list(path: Path, root: Path, image_column: str, label_column: str) -> tuple[str, Path, dict, dict]:
    _, columns = read_table(path, "list")
    for column, name in ((image_column, "image_column"), (label_column, "label_column")):
        if column not in columns:
            raise DataError(f"{name}: the list '{path.name}' has no column '{column}' (its columns: "
                            f"{', '.join(sorted(columns)) or 'none'}); name it with the {name} form field")
    kept, kept_labels, report = images.read_images(path, "list", image_column, label_column, str(root))
    if not kept:
        raise DataError(f"the list '{path.name}' names no readable images: {report['dropped']}")
    counts = Counter(str(label) for label in kept_labels)
    summary = {"images": len(kept), "dropped": report["dropped"]}
    if len(counts) <= MAX_REPORTED_LABELS:  # a regression list has as many labels as rows
        summary["classes"] = dict(sorted(counts.items()))
    extra = {"rows": len(kept), "columns": sorted(columns), "list": path.relative_to(root).as_posix(),
             "image_column": image_column, "label_column": label_column, "images": summary,
             "unreadable": _relative_files(report.get("bad_images", []), root)}
    return IMAGE_LIST, path, extra, {"splits": {}, "columns": {"image_column": image_column, "label_column": label_column}}


def _relative_files(bad: list[dict], root: Path) -> list[dict]:
    """The unreadable files by their paths inside the zip: the server's own folders are not the caller's business."""
    return [{"file": Path(b["file"]).resolve().relative_to(root).as_posix(), "reason": b["reason"].replace(f"{root}/", "")}
            for b in bad]


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in images.IMAGE_SUFFIXES for p in folder.iterdir() if p.is_file())


# ---------------------------------------------------------------- deletion (service.retention, DELETE /datasets/{id})


def delete(dataset_id: str) -> None:
    """Delete an upload: its record first (so it is unknown at once), then its file or extracted folder.

    Raises UnknownDataset for anything but a stored dataset's id; nothing outside the datasets folder is touched.
    """
    stored = lookup(dataset_id, "dataset_id")
    base = datasets_dir().resolve()
    target = (stored.folder or stored.path).resolve()
    if target.parent != base or not target.name.startswith(dataset_id):  # a record edited to point elsewhere
        raise UnknownDataset(f"dataset_id: '{dataset_id}' is recorded outside {base}; remove it by hand")
    (datasets_dir() / f"{dataset_id}.json").unlink()
    if target.is_dir():
        shutil.rmtree(target, ignore_errors=True)
    else:
        target.unlink(missing_ok=True)
