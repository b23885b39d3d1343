"""Read what an offline (or online) W&B run has durably on disk: the history rows of its transaction logs.

A W&B run writes every record to ``<wandb dir>/<run folder>/run-<id>.wandb``: a 7-byte header (``:W&B``, magic,
version) followed by LevelDB-log-format blocks of protobuf ``Record`` messages, each chunk guarded by a CRC-32.
A process killed mid-write leaves a torn tail, which the CRC or the length rejects; everything before it is durable.
A damaged record inside the file costs its block, not the records after it.
A resumed run writes a new folder with the same id, so a run's history is the union of its folders.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_HEADER = b":W&B"
_HEADER_LEN = 7
_BLOCK = 32 * 1024
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(data: bytes) -> Iterator[bytes]:
    """The payloads of the complete, CRC-checked records of a transaction log.

    A chunk that fails its CRC or has an unknown type (a damaged record) is skipped with the rest of its block, and
    reading goes on at the next block, as LevelDB's own reader does: the records after it are still durable. A torn
    tail (a chunk header or payload running past the end of the file) ends the log.
    """
    if not data.startswith(_HEADER):
        return
    pos, pending = _HEADER_LEN, None  # pending: the fragments of a record split over chunks, None outside one
    while True:
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER:  # block trailer: zero padding
            pos += left
            continue
        if pos + _CHUNK_HEADER > len(data):
            return
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        start, pos = pos + _CHUNK_HEADER, pos + _CHUNK_HEADER + length
        if pos > len(data):
            return
        payload = data[start:pos]
        if kind == 0 and length == 0 and crc == 0:  # zero padding to the block's end
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
            continue
        if (pos - 1) // _BLOCK != (start - _CHUNK_HEADER) // _BLOCK or kind not in (_FULL, _FIRST, _MIDDLE, _LAST) \
                or zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF != crc:
            pos, pending = start - _CHUNK_HEADER + left, None  # damaged: on to the next block
            continue
        if kind == _FULL:
            pending = None
            yield payload
        elif kind == _FIRST:
            pending = payload
        elif pending is not None:  # a MIDDLE or LAST whose FIRST was read
            pending += payload
            if kind == _LAST:
                yield pending
                pending = None


def history_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The history rows (key -> value) of one ``run-<id>.wandb`` file, in the order they were logged."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for payload in _records(Path(path).read_bytes()):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(payload)
        except Exception:  # noqa: BLE001 - a record this wandb version cannot read is not a history row
            continue
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            try:
                row[key] = json.loads(item.value_json)
            except ValueError:
                row[key] = item.value_json
        rows.append(row)
    return rows


def run_files(wandb_dir: str | os.PathLike, run_id: str) -> list[Path]:
    """Every transaction log of run ``run_id`` under a W&B directory (one per process that ran it)."""
    root = Path(wandb_dir)
    return sorted(root.glob(f"*-{run_id}/run-{run_id}.wandb")) if root.is_dir() else []


def logged_steps(files: list[Path], key_prefix: str, step_key: str = "trainer/global_step") -> set[int]:
    """The ``step_key`` values of the rows, in ``files``, that hold a key starting with ``key_prefix``."""
    steps = set()
    for path in files:
        for row in history_rows(path):
            if step_key in row and any(k.startswith(key_prefix) for k in row):
                steps.add(int(row[step_key]))
    return steps
