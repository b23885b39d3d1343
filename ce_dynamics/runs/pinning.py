"""Pinned eval instances: an eval set drawn from Hugging Face `datasets` once, then read from disk forever.

The first time an `hf` eval set is needed, its documents are drawn (streamed, shuffled with `seed`, the
first `count` kept: the paper's appendix A sampling) and written to
``<data.cache_dir>/eval_pins/<dataset>-<key hash>.jsonl``: a header line (the draw's key and the content
hash), then one ``{"text": ...}`` line per document, in order. The file holds raw text, so every tokenizer
reads the same instances, and a machine without network reads a file copied from one with it.

The key is (source spec, seed, count); the content hash is the SHA-256 of the documents. Two results are
comparable exactly when their eval hashes match; a dataset update upstream gives new pins only when the
old file is removed.

``python train.py mode=prepare experiment=...`` (or ``ce-dynamics data prepare experiment=...``) draws the
pins of an experiment's eval sets and prints where they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from ce_dynamics.files import atomic_open

# The seed of the eval sampling protocol (a seed-42 shuffle, as in the paper's pipeline): pins and the datamodule.
EVAL_SEED = 42
PIN_DIR = "eval_pins"
PIN_FORMAT = 1
SHUFFLE_BUFFER = 10_000
# The fields of an `hf` spec that decide which documents are drawn (not how they are tokenized).
_DRAW_FIELDS = ("path", "name", "split", "field", "data_files", "revision")
_LOCAL_BUILDERS = ("json", "parquet", "csv", "text", "arrow")


class MissingPinError(RuntimeError):
    """An eval set must be drawn but this machine is offline (or the draw failed); the message says which
    set and the command that makes its pin."""


@dataclass(frozen=True)
class Pin:
    """The pinned documents of one eval set, where they are, and their content hash."""

    path: Path
    key: dict[str, Any]
    hash: str
    documents: list[str]


def is_pinned_source(spec: Mapping[str, Any]) -> bool:
    """Whether an eval spec is drawn from Hugging Face `datasets` (and so pinned); built-in and file sources
    are deterministic on every machine and read directly."""
    return spec.get("source") == "hf"


def pin_key(spec: Mapping[str, Any], seed: int, count: int) -> dict[str, Any]:
    """What identifies a draw: the source fields, the shuffle seed and the number of documents."""
    if not spec.get("path"):
        raise ValueError(f"an hf eval set needs a dataset path (e.g. wikimedia/wikipedia), got spec {dict(spec)}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"the number of pinned documents must be a positive integer, got {count!r}")
    source = {k: _plain(spec[k]) for k in _DRAW_FIELDS if spec.get(k) is not None}
    source.setdefault("split", "train")
    source.setdefault("field", "text")
    return {"source": "hf", **source, "seed": int(seed), "count": int(count), "shuffle_buffer": SHUFFLE_BUFFER}


def pin_path(cache_dir: str | os.PathLike, spec: Mapping[str, Any], seed: int, count: int) -> Path:
    """Where the pin of this draw lives: ``<cache_dir>/eval_pins/<dataset>-<16 hex of the key>.jsonl``."""
    key = pin_key(spec, seed, count)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    label = "-".join(str(key[k]) for k in ("path", "name") if k in key)
    label = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-")[:60] or "dataset"
    return Path(cache_dir).expanduser() / PIN_DIR / f"{label}-{digest}.jsonl"


def content_hash(documents: list[str]) -> str:
    """SHA-256 (hex) of the documents, in order: equal hashes mean the same eval text."""
    digest = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))  # length-prefixed: ["ab","c"] != ["a","bc"]
        digest.update(data)
    return digest.hexdigest()


def draw_documents(spec: Mapping[str, Any], seed: int, count: int) -> list[str]:
    """Stream the dataset, shuffle it with `seed` (buffered), and keep the first `count` documents."""
    import datasets

    key = pin_key(spec, seed, count)
    kwargs = {"revision": key["revision"]} if "revision" in key else {}
    stream = datasets.load_dataset(key["path"], key.get("name"), split=key["split"],
                                   data_files=key.get("data_files"), streaming=True, **kwargs)
    field = key["field"]
    docs = []
    for row in islice(stream.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER), count):
        if field not in row:
            raise KeyError(f"dataset {key['path']} has no field {field!r} (fields: {sorted(row)})")
        docs.append(str(row[field]))
    return docs


def write_pin(path: str | os.PathLike, key: Mapping[str, Any], documents: list[str]) -> Pin:
    """Write a pin file atomically (a crash leaves no half file) and return it."""
    digest = content_hash(documents)
    header = {"format": PIN_FORMAT, "key": dict(key), "hash": digest, "num_documents": len(documents)}
    path = Path(path)
    with atomic_open(path, "w") as handle:
        handle.write(json.dumps(header, sort_keys=True) + "\n")
        for doc in documents:
            handle.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    return Pin(path, dict(key), digest, list(documents))


def read_pin(path: str | os.PathLike) -> Pin:
    """Read a pin file and check its documents against the hash in its header."""
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    try:
        header = json.loads(lines[0])
        documents = [json.loads(line)["text"] for line in lines[1:]]
    except (IndexError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a pin file (header line, then one {{\"text\": ...}} per line): {err!r}") from None
    if content_hash(documents) != header.get("hash") or len(documents) != header.get("num_documents"):
        raise ValueError(f"{path} is damaged: its documents do not match the hash in its header; delete it and "
                         f"draw it again on a machine with network")
    return Pin(path, header["key"], header["hash"], documents)


def offline() -> bool:
    """Whether Hugging Face access is switched off (`HF_DATASETS_OFFLINE` or `HF_HUB_OFFLINE`)."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def needs_network(spec: Mapping[str, Any]) -> bool:
    """False for a draw from local files only: a packaged builder (`json`, `parquet`, `csv`, `text`) over
    existing `data_files`, or a dataset folder on disk. Those are drawn offline too."""
    path = str(spec.get("path") or "")
    if path and Path(path).expanduser().is_dir():
        return False
    files = spec.get("data_files")
    if path not in _LOCAL_BUILDERS or not files:
        return True
    if isinstance(files, Mapping):
        files = [f for group in files.values() for f in ([group] if isinstance(group, str) else group)]
    elif isinstance(files, str):
        files = [files]
    return not all(Path(str(f)).expanduser().is_file() for f in files)


def prepare_command(experiment: str | None = None) -> str:
    """The command that draws the pins of an experiment, for error messages."""
    return f"python train.py mode=prepare experiment={experiment or '<experiment>'} (on a machine with network)"


def pinned_documents(spec: Mapping[str, Any], seed: int, count: int, cache_dir: str | os.PathLike,
                     name: str = "eval set", experiment: str | None = None) -> Pin:
    """The pin of this draw: read from `cache_dir`, else drawn now and written (online only).

    Raises MissingPinError when it is not on disk and this machine is offline or the draw fails.
    """
    path = pin_path(cache_dir, spec, seed, count)
    if path.exists():
        return read_pin(path)
    source = " ".join(str(spec[k]) for k in ("path", "name") if spec.get(k))
    where = f"eval set {name!r} ({source}, seed {seed}, {count} documents)"
    if offline() and needs_network(spec):
        raise MissingPinError(f"{where} is not pinned in {path.parent} and this machine is offline; make it with "
                              f"`{prepare_command(experiment)}` and copy {path} here")
    try:
        documents = draw_documents(spec, seed, count)
    except KeyError:
        raise
    except Exception as err:  # noqa: BLE001 - datasets raises many types for "no network" / "no such dataset"
        raise MissingPinError(f"cannot draw {where}: {type(err).__name__}: {' '.join(str(err).split())[:300]}; "
                              f"pin it with `{prepare_command(experiment)}` and copy {path} here") from err
    if not documents:
        raise ValueError(f"{where}: the dataset yielded no documents")
    return write_pin(path, pin_key(spec, seed, count), documents)


def ensure_pins(cfg: Any) -> dict[str, Pin]:
    """The pins of `cfg.data.eval_sets` that come from `datasets`, drawn now where missing (online), so that
    a missing pin offline fails before any model is loaded. Keyed by eval set name."""
    from omegaconf import OmegaConf

    pins = {}
    for name in cfg.data.eval_sets:
        spec = OmegaConf.to_container(cfg.data.eval[name], resolve=True)
        if is_pinned_source(spec):
            pins[name] = pinned_documents(spec, EVAL_SEED, int(cfg.data.eval_sequences), cfg.data.cache_dir,
                                          name=name, experiment=cfg.experiment)
    return pins


def record_pins(cfg: Any) -> int | None:
    """Check (or draw) the pins of `cfg`'s eval sets and put their hashes into `cfg.eval_pins` (so the W&B
    run config carries them). Returns None to go on, or 2 after printing the one-line error."""
    from omegaconf import OmegaConf

    try:
        pins = ensure_pins(cfg)
    except (MissingPinError, ValueError, KeyError) as err:
        print(f"train.py: {err}", file=sys.stderr)
        return 2
    OmegaConf.update(cfg, "eval_pins", {name: pin.hash for name, pin in pins.items()}, force_add=True)
    return None


def run_prepare(cfg: Any) -> int:
    """mode=prepare: draw (or find) the pins of the experiment's eval sets and print where they are."""
    try:
        pins = ensure_pins(cfg)
    except (MissingPinError, ValueError, KeyError) as err:
        print(f"prepare: {err}", file=sys.stderr)
        return 2
    if not pins:
        print(f"prepare: none of experiment {cfg.experiment}'s eval sets ({', '.join(cfg.data.eval_sets)}) comes "
              f"from Hugging Face datasets; nothing to pin")
        return 0
    for name, pin in pins.items():
        print(f"{name}: {pin.path} ({len(pin.documents)} documents, sha256 {pin.hash})")
    folder = Path(cfg.data.cache_dir).expanduser() / PIN_DIR
    print(f"copy {folder} to the same data.cache_dir on the offline machine (or pass data.cache_dir=...)")
    return 0


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value
