"""An uploaded table's row count and columns, read by finetune_core.tables in a child process.

Why a process and not a thread: reading 100 MB of CSV holds the GIL in long C calls (decoding the
text, copying it into StringIO: 0.2-0.7 s each) and makes ~900k row dicts whose garbage collection
pauses every thread. From a thread-pool thread that still stalled the worker's event loop for up to
1.2 s (tests/test_service_responsive.py); a child shares no GIL and hands back its memory when it
exits. It imports only the table reader (0.3 s), so small tables are read in the caller's thread
(service.datasets.CHILD_PARSE_BYTES).

    python -m service.table_shape PATH   prints {"rows": N, "columns": [...]} or {"error": MESSAGE}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from finetune_core.errors import DataError
from finetune_core.tables import read_table

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def shape_in_child(path: Path, role: str, timeout: float) -> tuple[int, list[str]]:
    """(rows, sorted columns) of the table at path, read in a child; a DataError as read_table raises it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])))
    try:
        child = subprocess.run([sys.executable, "-m", "service.table_shape", str(path), role], cwd=PACKAGE_ROOT,
                               env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise DataError(f"file: reading the table took over {timeout:g} s; upload a smaller file") from None
    if child.returncode != 0:
        raise RuntimeError(f"the table reader exited with {child.returncode}: {child.stderr.strip()[-2000:]}")
    answer = json.loads(child.stdout)
    if "error" in answer:
        raise DataError(answer["error"])
    return answer["rows"], answer["columns"]


def main(path: str, role: str) -> None:
    try:
        rows, columns = read_table(path, role)
    except DataError as err:
        print(json.dumps({"error": str(err)}))
        return
    print(json.dumps({"rows": len(rows), "columns": sorted(columns)}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
