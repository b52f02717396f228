"""The only code that knows where artifacts live: versions, their manifests and aliases.

Layout under the root (env FINETUNE_SERVE_HOME, default ./.finetune-serve):

    models/<name>/v<N>/            one immutable version: the model folder, variant files, manifest.json
    models/<name>/v<N>.deleted     tombstone of a deleted version, so its number is never reused
    models/<name>/production.json  the production alias and the versions it pointed at before
    models/<name>/.lock            held around every read-modify-write of production.json
    .incoming-*/                   a version being written; renamed into place when complete

A version is copied into a temporary folder inside the root and renamed into place in one step,
so a reader never sees half a version. `latest` is the highest version present; `production` is
set by `promote`. Every file used by a predictor is checked against the sha256 in the manifest.

Several API workers, pods and CLI runs share the folder: promote, rollback and delete read
production.json and write it back holding the model's lock file (an flock, across processes and
threads), so none loses another's change. Claiming a version number needs no lock: it is a rename
that fails when the number is taken.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import ConfigError, FinetuneError
from .metadata import Manifest, read_manifest, write_manifest

log = logging.getLogger(__name__)

ROOT_ENV = "FINETUNE_SERVE_HOME"
DEFAULT_ROOT = ".finetune-serve"
LATEST = "latest"
PRODUCTION = "production"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_NAME_MAX = 64
_VERSION = re.compile(r"v([1-9][0-9]*)")


class NotFoundError(FinetuneError):
    """A model, version, alias or variant that does not exist (the service answers 404)."""


class IntegrityError(FinetuneError):
    """A stored file does not match the checksum its manifest recorded."""


class RegistryError(FinetuneError):
    """An operation the registry refuses, e.g. deleting the production version without force."""


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    manifest: Manifest
    path: Path  # the version folder; read files through model_dir() and variant_file(), which verify them

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"


def root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def validate_name(name: str) -> str:
    """Refuse model names that could escape the root or surprise a shell or URL."""
    if not isinstance(name, str) or not name:
        raise ConfigError("model name: must be a non-empty string")
    if len(name) > _NAME_MAX or not _NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"model name '{name[:80]}' is not allowed: use 1-{_NAME_MAX} characters from letters, digits, "
            "'.', '_' and '-', starting with a letter or digit, without '..'"
        )
    return name


def parse_ref(text: str) -> tuple[str, str | None]:
    """Split 'NAME[:VERSION|:production|:latest]' into (name, ref or None)."""
    name, _, ref = text.partition(":")
    validate_name(name)
    if ref and ref not in (LATEST, PRODUCTION) and not _VERSION.fullmatch(ref):
        raise ConfigError(f"'{text}': after ':' give a version like v3, or 'latest' or 'production'")
    return name, ref or None


def register(name: str, staging_dir: str | Path, manifest: Manifest) -> VersionInfo:
    """Copy a staged version into the registry as the next version and return it.

    Each variant's `file` (relative to staging_dir, a file or a folder) gets its size and sha256
    recorded; the name, version and creation time are set in the manifest.
    """
    validate_name(name)
    staging_dir = Path(staging_dir)
    if not staging_dir.is_dir():
        raise RegistryError(f"staging folder '{staging_dir}' does not exist; nothing to register")
    for variant, record in manifest.variants.items():
        if record.file is not None and not (staging_dir / record.file).exists():
            raise RegistryError(f"variant '{variant}': its file '{record.file}' is not in the staging folder {staging_dir}")
    model_root = _model_root(name)
    model_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_scratch()
    incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=root()))
    try:
        shutil.copytree(staging_dir, incoming, dirs_exist_ok=True)
        variants = {variant: replace(record, **_digest(incoming / record.file)) if record.file else record
                    for variant, record in manifest.variants.items()}
        version = _claim_version(model_root, incoming, replace(manifest, name=name, created=_now(), variants=variants))
    except OSError as err:
        shutil.rmtree(incoming, ignore_errors=True)
        reason = disk_full(err)
        if reason is None:
            raise
        raise RegistryError(f"could not register {name}: the disk holding {root()} is full ({reason}); "
                            "nothing was registered. Free space and export again") from None
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    log.info("registered %s:%s", name, version)
    return resolve(name, version)


# What a write into a full disk, a full quota or past a file-size limit (RLIMIT_FSIZE) fails with.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full(err: OSError) -> str | None:
    """The reason ("No space left on device") when err is a write that found no room, else None.

    shutil.copytree gathers its files' errors into one shutil.Error as text, so the text is read too.
    """
    for code in DISK_FULL:
        if err.errno == code or os.strerror(code) in str(err):
            return os.strerror(code)
    return None


def resolve(name: str, ref: str | None = None) -> VersionInfo:
    """Find a version by 'vN', 'latest' or 'production'; None means production when set, else latest."""
    versions = _existing_versions(name)
    if ref is None:
        ref = PRODUCTION if _production(name) else LATEST
    if ref == LATEST:
        version = versions[-1]
    elif ref == PRODUCTION:
        version = _production(name)
        if version is None:
            raise NotFoundError(f"model '{name}' has no production version yet; promote one with `finetune-serve models promote {name} VERSION`")
    elif ref in versions:
        version = ref
    else:
        raise NotFoundError(f"model '{name}' has no version '{ref}'; it has {', '.join(versions)}")
    path = _model_root(name) / version
    return VersionInfo(name=name, version=version, manifest=read_manifest(path), path=path)


def registered_from(name: str, run_dir: str | Path) -> VersionInfo | None:
    """The version of `name` registered from a run folder (its manifest's source_run, or for a distilled
    student the folder it was proved from), or None.

    How a job's registration is found when its process died between registering and recording it.
    """
    source = str(Path(run_dir).resolve())
    folder = _model_root(validate_name(name))
    for version in reversed(_versions(name)):
        try:
            manifest = read_manifest(folder / version)
        except FinetuneError:  # a damaged version is no run's registration; resolving it says what is wrong
            continue
        if source in (manifest.source_run, manifest.proof.get("student")):
            return resolve(name, version)
    return None


def variant_file(info: VersionInfo, variant: str) -> Path:
    """The path of a variant's file or folder, after checking it against the manifest's sha256."""
    record = info.manifest.variants.get(variant)
    if record is None or not record.file:
        raise NotFoundError(f"{info.ref} has no stored file for variant '{variant}'")
    path = info.path / record.file
    _check(info, record.file, record.sha256, _digest(path)["sha256"] if path.exists() else "missing")
    return path


def integrity_error(info: VersionInfo) -> str | None:
    """Why a version's stored files do not match its manifest (variant_file's message), or None when they do.

    For `show`: each file's sha256 is remembered by (path, inode, size, mtime), so a repeated check only
    stats the files; loading a predictor (variant_file) always reads them in full.
    """
    for record in info.manifest.variants.values():
        if record.file:
            path = info.path / record.file
            try:
                _check(info, record.file, record.sha256,
                       _digest(path, _sha256_remembered)["sha256"] if path.exists() else "missing")
            except IntegrityError as err:
                return str(err)
    return None


def _check(info: VersionInfo, file: str, recorded: str | None, found: str) -> None:
    if found != recorded:
        raise IntegrityError(
            f"{info.ref}: '{file}' does not match its manifest (sha256 {found[:12]} != "
            f"{(recorded or 'none')[:12]}); the file was changed or damaged. Re-export the model with "
            f"`finetune-serve export` and delete this version"
        )


def model_dir(info: VersionInfo) -> Path:
    """The verified model folder (weights, tokenizer, finetune_serve.json) of a version."""
    return variant_file(info, "pytorch")


# A distilled student's folder (the `distilled` variant) is a model folder with its ONNX export beside the weights.
STUDENT_ONNX = "model.onnx"


def student_files(info: VersionInfo) -> tuple[Path, Path]:
    """The verified folder of a version's distilled student and the ONNX file in it that serves `distilled`."""
    folder = variant_file(info, "distilled")
    return folder, folder / STUDENT_ONNX


def promote(name: str, version: str) -> VersionInfo:
    """Point `production` at a version, remembering the previous one for `rollback`."""
    with _locked(name):
        info = resolve(name, version)
        alias = _read_production(name) or {"version": None, "history": []}
        history = alias["history"]
        if alias["version"] not in (None, info.version):
            history = history + [alias["version"]]
        _write_json_atomic(_model_root(name) / "production.json", {"version": info.version, "history": history})
    log.info("promoted %s to production", info.ref)
    return info


def previous_production(name: str) -> str | None:
    """The version production pointed at before the last promote (what `rollback` would restore), or None."""
    alias = _read_production(validate_name(name))
    existing = set(_versions(name))
    history = [v for v in (alias["history"] if alias else []) if v in existing]
    return history[-1] if history else None


def rollback(name: str) -> VersionInfo:
    """Point `production` back at the version it pointed at before the last promote."""
    validate_name(name)
    with _locked(name):
        alias = _read_production(name)
        existing = set(_versions(name))
        history = [v for v in (alias["history"] if alias else []) if v in existing]
        if not history:
            raise RegistryError(f"model '{name}' has no earlier production version to roll back to")
        _write_json_atomic(_model_root(name) / "production.json", {"version": history[-1], "history": history[:-1]})
    log.info("rolled %s production back to %s", name, history[-1])
    return resolve(name, history[-1])


def delete(name: str, version: str, force: bool = False) -> None:
    """Delete one version; the production version only with force (which also clears the alias)."""
    info = resolve(name, version)
    # Locked: a promote of this version between our check and the rename would leave production pointing at nothing.
    with _locked(name):
        if info.version == _production(name):
            if not force:
                raise RegistryError(
                    f"{info.ref} is the production version; promote another version first, or pass --force"
                )
            (_model_root(name) / "production.json").unlink()
            log.warning("deleted the production version %s; %s has no production version now", info.ref, name)
        # Rename first so readers see the whole version or none of it, then remove at leisure.
        trash = Path(tempfile.mkdtemp(prefix=".deleting-", dir=root()))
        tombstone = _model_root(name) / f"{info.version}.deleted"
        tombstone.write_text(json.dumps({"deleted": _now()}))
        os.rename(info.path, trash / info.version)
    shutil.rmtree(trash, ignore_errors=True)


def list_models() -> list[dict]:
    """Every model with its versions and aliases, sorted by name."""
    models_dir = root() / "models"
    if not models_dir.is_dir():
        return []
    out = []
    for folder in sorted(models_dir.iterdir()):
        versions = _versions(folder.name)
        if versions:
            out.append({"name": folder.name, "versions": versions, LATEST: versions[-1], PRODUCTION: _production(folder.name)})
    return out


def show(name: str, ref: str | None = None) -> dict:
    """With a ref: that version's manifest and aliases. Without: a summary of every version."""
    if ref is not None:
        info = resolve(name, ref)
        return dict(info.manifest.to_dict(), version=info.version, aliases=_aliases_of(name, info.version),
                    **_integrity(info))
    versions = _existing_versions(name)
    summaries = []
    for version in versions:
        info = resolve(name, version)
        manifest = info.manifest
        summaries.append({
            "version": version,
            "created": manifest.created,
            "aliases": _aliases_of(name, version),
            "validation_accuracy": (manifest.validation_metrics or {}).get("accuracy"),
            "variants": {v: record.accepted for v, record in manifest.variants.items()},
            **_integrity(info),
        })
    return {"name": name, LATEST: versions[-1], PRODUCTION: _production(name), "versions": summaries}


def _integrity(info: VersionInfo) -> dict:
    """{"integrity": "ok"}, or {"integrity": "failed", "error": which file does not match its manifest}."""
    error = integrity_error(info)
    return {"integrity": "ok"} if error is None else {"integrity": "failed", "error": error}


def _model_root(name: str) -> Path:
    return root() / "models" / name


# Longer than any read-modify-write of production.json takes; a holder this slow is stuck (a hung NFS mount).
LOCK_TIMEOUT_SECONDS = 60


@contextmanager
def _locked(name: str) -> Iterator[None]:
    """Hold the model's lock file: one read-modify-write of its aliases at a time, across processes and threads."""
    _existing_versions(name)  # an unknown model has no folder to lock, and nothing to change
    lock = FileLock(_model_root(name) / ".lock", timeout=LOCK_TIMEOUT_SECONDS)
    try:
        lock.acquire()
    except Timeout:
        raise RegistryError(f"model '{name}': another process held {lock.lock_file} for {LOCK_TIMEOUT_SECONDS}s; "
                            "try again, and if it persists look for a stuck `finetune-serve models` command") from None
    try:
        yield
    finally:
        lock.release()


def _versions(name: str) -> list[str]:
    folder = _model_root(name)
    if not folder.is_dir():
        return []
    found = [p.name for p in folder.iterdir() if p.is_dir() and _VERSION.fullmatch(p.name)]
    return sorted(found, key=lambda v: int(v[1:]))


def _existing_versions(name: str) -> list[str]:
    versions = _versions(validate_name(name))
    if not versions:
        raise NotFoundError(f"no model named '{name}' in the registry at {root()}; see `finetune-serve models list`")
    return versions


# A register or delete takes seconds; scratch folders this old were left by a killed process.
STALE_SCRATCH_SECONDS = 3600


def _remove_stale_scratch() -> None:
    """Remove .incoming-*/.deleting-* folders that a hard kill left behind (readers never look at them)."""
    cutoff = time.time() - STALE_SCRATCH_SECONDS
    for pattern in (".incoming-*", ".deleting-*"):
        for folder in root().glob(pattern):
            try:
                stale = folder.is_dir() and folder.stat().st_mtime < cutoff
            except FileNotFoundError:  # another register finished (renamed its scratch) between glob and stat
                continue
            if stale:
                shutil.rmtree(folder, ignore_errors=True)


def _claim_version(model_root: Path, incoming: Path, manifest: Manifest) -> str:
    # rename() onto an existing non-empty folder fails, so two writers never get the same number.
    for _ in range(100):
        taken = [int(m.group(1)) for p in model_root.iterdir() if (m := _VERSION.match(p.name))]
        version = f"v{max(taken, default=0) + 1}"
        write_manifest(replace(manifest, version=version), incoming)
        try:
            os.rename(incoming, model_root / version)
            return version
        except OSError:
            continue
    raise RegistryError(f"could not claim a new version number under {model_root}; is another export looping?")


def _digest(path: Path, sha256=None) -> dict:
    """Size and sha256 of a file; for a folder, the sha256 of its sorted (relative path, sha256) list."""
    sha256 = sha256 or _sha256_file
    if path.is_file():
        return {"size": path.stat().st_size, "sha256": sha256(path)}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = "".join(f"{p.relative_to(path).as_posix()}\0{sha256(p)}\n" for p in files)
    return {"size": sum(p.stat().st_size for p in files), "sha256": hashlib.sha256(listing.encode()).hexdigest()}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# sha256 by (path, inode, size, mtime_ns): a file rewritten or changed in place gets a new mtime. Bounded: cleared
# when full (a registry of many versions then hashes again once).
_REMEMBERED_MAX = 10_000
_remembered: dict[tuple[str, int, int, int], str] = {}


def _sha256_remembered(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    found = _remembered.get(key)
    if found is None:
        if len(_remembered) >= _REMEMBERED_MAX:
            _remembered.clear()
        found = _remembered[key] = _sha256_file(path)
    return found


def _read_production(name: str) -> dict | None:
    path = _model_root(name) / "production.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _production(name: str) -> str | None:
    alias = _read_production(name)
    return alias["version"] if alias else None


def _aliases_of(name: str, version: str) -> list[str]:
    versions = _versions(name)
    aliases = [LATEST] if versions and versions[-1] == version else []
    return aliases + ([PRODUCTION] if _production(name) == version else [])


def _write_json_atomic(path: Path, value: dict) -> None:
    # A unique scratch name: API replicas in other pods share the folder and may well have the same pid.
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as tmp:
        tmp.write(json.dumps(value))
        tmp.flush()
        os.fsync(tmp.fileno())  # the rename must never publish an empty file after a crash
    os.chmod(tmp.name, 0o644)  # as a plain write would leave it (the scratch file starts private)
    os.replace(tmp.name, path)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
