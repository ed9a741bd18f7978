"""Raw row readers: CSV, JSONL / JSON (optionally .gz), parquet and HF ``datasets`` folders.

Each yields ``(location, row)`` where location is what an error message should point at: a line
number for CSV and JSONL, ``item N`` for a JSON array, ``row N`` for parquet and datasets.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Iterator

from chatrlhf.errors import DataError

Row = tuple[int | str, dict]


def file_kind(path: Path) -> str:
    if path.is_dir():
        return "datasets"
    name = path.name.lower().removesuffix(".gz")
    for ext, kind in ((".csv", "csv"), (".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"),
                      (".parquet", "parquet"), (".txt", "txt")):
        if name.endswith(ext):
            return kind
    raise DataError(path, None, None, "unknown file type",
                    "use .csv, .jsonl, .json, .parquet, .txt (optionally .gz) or a HF datasets folder")


def read_text(path: Path) -> str:
    """The file as text; non-UTF-8 bytes are an error naming the line and the byte."""
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except OSError as e:
            raise DataError(path, None, None, f"not a valid gzip file ({e})", "re-compress it or drop .gz") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(path, line, None, f"not valid UTF-8: byte 0x{raw[e.start]:02x} at column {col}",
                        "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def read_rows(path: str | Path) -> Iterator[Row]:
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "file not found", f"check the path (relative to {Path.cwd()})")
    kind = file_kind(path)
    if kind == "csv":
        yield from _csv_rows(path)
    elif kind == "jsonl":
        yield from _jsonl_rows(path)
    elif kind == "json":
        yield from _json_rows(path)
    elif kind == "txt":
        for n, line in enumerate(read_text(path).splitlines(), 1):
            if line.strip():
                yield n, {"prompt": line.strip()}
    elif kind == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(gzip.decompress(path.read_bytes())) if path.name.endswith(".gz") else path)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(path, None, None, f"cannot read parquet ({e})", "check the file") from None
        for n, row in enumerate(table.to_pylist(), 1):
            yield f"row {n}", row
    else:
        yield from _datasets_rows(path)


def _csv_rows(path: Path) -> Iterator[Row]:
    text = read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise DataError(path, 1, None, "empty CSV (no header line)", "the first line must name the columns")
    start = 2
    try:
        for row in reader:
            if None in row:
                raise DataError(path, start, None, f"{len(reader.fieldnames) + len(row[None])} values "
                                f"but {len(reader.fieldnames)} columns", "quote fields that contain commas")
            yield start, row
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(path, reader.line_num, None, f"malformed CSV ({e})", "check quoting") from None


def _jsonl_rows(path: Path) -> Iterator[Row]:
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, n, None, f"bad JSON ({e.msg} at column {e.colno})",
                            "each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise DataError(path, n, None, f"expected a JSON object, got {type(obj).__name__}",
                            "each line must be one JSON object")
        yield n, obj


def _json_rows(path: Path) -> Iterator[Row]:
    text = read_text(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, None, f"bad JSON ({e.msg} at column {e.colno})", "fix the JSON") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(path, None, None, "expected a JSON array of objects (or {\"data\": [...]})",
                        "or use JSONL, one object per line")
    for n, item in enumerate(obj, 1):
        if not isinstance(item, dict):
            raise DataError(path, f"item {n}", None, f"expected an object, got {type(item).__name__}", "")
        yield f"item {n}", item


def _datasets_rows(path: Path) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError or its own errors
        raise DataError(path, None, None, f"not a HF datasets folder ({e})",
                        "save it with Dataset.save_to_disk, or point at a file") from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    for n, row in enumerate(ds, 1):
        yield f"row {n}", dict(row)
