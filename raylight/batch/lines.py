"""The files of a batch job: input lines in, result rows out, and what a rerun finds already done.

Every input line has a key: `("id", custom_id)` for a line with a string `custom_id` seen for the first time,
`("line", n)` (its 1-based line number) for a line without one (invalid JSON, no custom_id) or one repeating
an earlier line's custom_id. A result row carries the same key: its `custom_id`, plus a `line` field only for
line-keyed rows. Resuming is "skip every key that has a row in the output or in a part file".

Each rank that drives an engine appends its rows to its own part file (`<output>.part-<rank>`), one JSON
object per line, flushed per row: a killed job leaves complete rows plus at most one torn last line, which
readers skip and the rank's next run cuts off before appending. At the end rank 0 merges the output and the
parts into the output (input order; rows whose key the input no longer has go last), through a temporary
file and an atomic rename, and removes the parts.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

Key = tuple[str, Any]

URLS = ("/v1/chat/completions", "/v1/completions")


@dataclass
class BatchItem:
    """One input line: its key and request, or why it cannot run (`error`: (code, message))."""

    line: int  # 1-based line number in the input file
    key: Key
    custom_id: Optional[str] = None
    url: str = ""
    body: dict[str, Any] = field(default_factory=dict)
    error: Optional[tuple[str, str]] = None


def parse_line(text: str, line: int, seen: set[str]) -> BatchItem:
    """One input line (OpenAI's batch format: custom_id, method, url, body). `seen` holds the custom_ids of
    earlier lines and is updated."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return BatchItem(line, ("line", line), error=("invalid_json", f"line {line} is not JSON: {e}"))
    if not isinstance(obj, dict):
        return BatchItem(line, ("line", line), error=("invalid_json", f"line {line} is not a JSON object"))
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return BatchItem(line, ("line", line), custom_id=cid if isinstance(cid, str) else None,
                         error=("missing_custom_id", f"line {line} has no custom_id (a non-empty string)"))
    if cid in seen:
        return BatchItem(line, ("line", line), custom_id=cid,
                         error=("duplicate_custom_id", f"line {line} repeats custom_id {cid!r} of an earlier line"))
    seen.add(cid)
    item = BatchItem(line, ("id", cid), custom_id=cid, url=obj.get("url") if isinstance(obj.get("url"), str) else "")
    method = obj.get("method", "POST")
    if not isinstance(method, str) or method.upper() != "POST":
        item.error = ("invalid_method", f"method must be POST, got {method!r}")
    elif item.url not in URLS:
        item.error = ("invalid_url", f"url must be one of {list(URLS)}, got {obj.get('url')!r}")
    elif not isinstance(obj.get("body"), dict):
        item.error = ("invalid_body", "body must be a JSON object (the request's body)")
    else:
        item.body = obj["body"]
    return item


def read_input(path: str) -> list[BatchItem]:
    """Every non-blank line of the input file, in order."""
    items: list[BatchItem] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            if text.strip():
                items.append(parse_line(text, n, seen))
    return items


def row_key(row: dict[str, Any]) -> Key:
    return ("line", row["line"]) if "line" in row else ("id", row.get("custom_id"))


def iter_rows(path: str) -> Iterator[dict[str, Any]]:
    """The complete rows of a results file; a torn or foreign line (a killed writer's last) is skipped."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        return
    with f:
        for text in f:
            if not text.endswith("\n"):
                break  # torn: the writer died in the middle of this row
            try:
                row = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and ("custom_id" in row or "line" in row):
                yield row


def part_path(output: str, rank: int) -> str:
    return f"{output}.part-{rank:05d}"


def part_files(output: str) -> list[str]:
    return sorted(glob.glob(glob.escape(output) + ".part-*"))


def done_keys(output: str) -> set[Key]:
    """Keys that already have a row, in the output or in any part file."""
    done = {row_key(r) for r in iter_rows(output)}
    for part in part_files(output):
        done.update(row_key(r) for r in iter_rows(part))
    return done


class PartWriter:
    """Appends rows to one rank's part file, one flushed line each."""

    def __init__(self, path: str):
        self.path = path
        _cut_torn_tail(path)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _cut_torn_tail(path: str) -> None:
    """Drops a last line without its newline (left by a killed run), so appended rows start on a line."""
    try:
        with open(path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            pos = size
            while pos > 0:
                step = min(65536, pos)
                f.seek(pos - step)
                chunk = f.read(step)
                i = chunk.rfind(b"\n")
                if i >= 0:
                    f.truncate(pos - step + i + 1)
                    return
                pos -= step
            f.truncate(0)
    except FileNotFoundError:
        pass


def merge(output: str, items: list[BatchItem]) -> tuple[int, int, list[BatchItem]]:
    """Writes every row of the output and the part files into the output, one per key, in the input's
    order (rows of keys not in the input after them), then removes the parts. Returns the number of rows
    written, how many of them hold an error, and the input items that have no row."""
    rows: dict[Key, dict[str, Any]] = {}
    parts = part_files(output)
    for path in [output, *parts]:
        for row in iter_rows(path):
            rows.setdefault(row_key(row), row)
    tmp = f"{output}.merging"
    written, errors, missing = 0, 0, []
    with open(tmp, "w", encoding="utf-8") as f:
        for item in items:
            row = rows.pop(item.key, None)
            if row is None:
                missing.append(item)
                continue
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            written, errors = written + 1, errors + (row.get("error") is not None)
        for row in rows.values():  # from an earlier input: kept, never dropped
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            written, errors = written + 1, errors + (row.get("error") is not None)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, output)
    for path in parts:
        os.remove(path)
    return written, errors, missing
