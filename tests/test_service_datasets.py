"""Uploads saved by service.datasets without a server: stale temporaries are swept, threads never collide."""

from __future__ import annotations

import os
import threading
import time

from service import datasets

HOUR = 3600


def _age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def _csv(rows: int, tag: str) -> bytes:
    return ("text,label\n" + "".join(f"{tag} row {i},{'a' if i % 2 else 'b'}\n" for i in range(rows))).encode()


def test_an_upload_sweeps_the_temporaries_a_killed_upload_left():
    folder = datasets.datasets_dir()
    folder.mkdir(parents=True)
    old_table = folder / ".ds-00000000000000aa.part.csv"  # killed while writing or parsing a table
    old_zip = folder / ".ds-00000000000000bb.part.zip"  # killed while extracting a zip ...
    old_extracted = folder / ".ds-00000000000000bb.part"  # ... into this folder
    fresh = folder / ".ds-00000000000000cc.part.jsonl"  # another worker's upload in progress
    kept = [folder / "ds-00000000000000dd.csv", folder / "ds-00000000000000dd.json"]  # an old, finished dataset
    (old_extracted / "train" / "cat").mkdir(parents=True)
    (old_extracted / "train" / "cat" / "1.png").write_bytes(b"png")
    for path in (old_table, old_zip, fresh, *kept):
        path.write_bytes(b"x")
    for path in (old_table, old_zip, old_extracted, *kept):
        _age(path, 2 * HOUR)
    _age(fresh, datasets.STALE_PARTIAL_SECONDS - 60)

    info = datasets.save_upload("new.csv", iter([_csv(4, "new")]))

    assert info.rows == 4
    left = sorted(p.name for p in folder.iterdir())
    assert left == sorted([fresh.name, *(p.name for p in kept), f"{info.id}.csv", f"{info.id}.json"])


def test_the_sweep_names_what_it_removed_and_keeps_the_rest():
    folder = datasets.datasets_dir()
    folder.mkdir(parents=True)
    stale, young = folder / ".ds-0000000000000001.part.tsv", folder / ".ds-0000000000000002.part.tsv"
    stale.write_bytes(b"x")
    young.write_bytes(b"x")
    _age(stale, 120)
    assert datasets.remove_stale_partials(max_age=60) == [stale.name]
    assert sorted(p.name for p in folder.iterdir()) == [young.name]
    assert datasets.remove_stale_partials(max_age=60) == []


def test_concurrent_uploads_in_one_process_keep_their_own_files():
    """Threads of one worker save at once: each upload gets its own temporaries and its own rows."""
    count, start = 8, threading.Barrier(8)
    results: dict[int, datasets.DatasetInfo] = {}
    errors: list[BaseException] = []

    def chunks(i: int):
        start.wait(10)  # every thread is inside save_upload, writing its temporary, at the same time
        body = _csv(100 + i, f"t{i}")
        for offset in range(0, len(body), 256):
            yield body[offset : offset + 256]

    def save(i: int) -> None:
        try:
            results[i] = datasets.save_upload(f"upload{i}.csv", chunks(i))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len({info.id for info in results.values()}) == count
    for i, info in results.items():
        assert info.rows == 100 + i
        stored = datasets.lookup(info.id, "train").path.read_text()
        assert stored == _csv(100 + i, f"t{i}").decode()
    assert not list(datasets.datasets_dir().glob(datasets.PARTIAL_GLOB))


def test_a_large_table_is_read_in_a_child_with_the_same_answers_and_errors():
    row = "a review long enough to fill the table quickly with words,positive\n"
    rows = datasets.CHILD_PARSE_BYTES // len(row) + 1_000  # just over the size read in a child
    body = ("text,label\n" + row * rows).encode()
    assert len(body) > datasets.CHILD_PARSE_BYTES
    info = datasets.save_upload("big.csv", iter([body]))
    assert (info.rows, info.columns, info.format) == (rows, ["label", "text"], "csv")

    broken = body + b"one,field,too many\n"
    try:
        datasets.save_upload("broken.csv", iter([broken]))
    except datasets.DataError as err:
        message = str(err)
    else:
        raise AssertionError("a row with more fields than the header was accepted")
    # the message the same file gets when read in the thread (service.datasets for small tables)
    assert message == (f"file: uploaded file 'broken.csv' line {rows + 2}: 3 fields, but the header has 2 "
                       "(comma-separated); quote fields that contain the delimiter"), message
    assert not list(datasets.datasets_dir().glob(datasets.PARTIAL_GLOB))
