"""Loaded at start-up by the processes of tests/test_multiprocess.py (PYTHONPATH): an audit hook that records every
write-like operation (open for writing, mkdir, rename/replace, remove, rmtree, truncate) under CHATRLHF_AUDIT_OUT,
into CHATRLHF_AUDIT_LOG/rank-$RANK.log — so the test can check that only rank 0 writes into the run's folder."""

import os
import sys

OUT = os.environ.get("CHATRLHF_AUDIT_OUT")
RANK = os.environ.get("RANK")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _under_out(path) -> bool:
    try:
        return os.path.abspath(os.fsdecode(path)).startswith(OUT)
    except (TypeError, ValueError):
        return False  # a file descriptor, not a path


def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (mode is None and flags & WRITE_FLAGS)
        paths = [path] if writing else []
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
        paths = [args[0]]
    elif event in ("os.rename", "os.replace"):
        paths = [args[0], args[1]]
    else:
        return
    hits = [os.fsdecode(p) for p in paths if _under_out(p)]
    if hits:
        with open(os.path.join(os.environ["CHATRLHF_AUDIT_LOG"], f"rank-{RANK}.log"), "a") as f:
            f.write(f"{event} {' '.join(hits)}\n")


if OUT and RANK is not None:
    OUT = os.path.abspath(OUT)
    sys.addaudithook(_hook)
