"""Corpora, tokenizers and the eval sampling protocol, packaged as a LightningDataModule.

Built-in corpora exist on every machine with Python: the standard library's `.py` files, split by file into
train and eval ("code", like The Pile's GitHub slice), and the prose of `pydoc_data.topics` ("prose").
Further sources: local text/jsonl files (`file`) and Hugging Face `datasets` (`hf`, streamed).

Instances: documents are shuffled with seed 42, tokenized in that order, joined with the EOS token and cut
into consecutive windows of `seq_len` tokens; an eval set keeps the first `eval_sequences` windows.
Eval sets from `datasets` follow the paper's appendix A instead: the first `eval_sequences` documents of the
seed-42 shuffle, pinned to disk once (`ce_dynamics.runs.pinning`), one instance per document (its first `seq_len`
tokens; a shorter document is padded and its padding is not scored).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import sys
import sysconfig
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ce_dynamics._extras import require

require("lightning", "tokenizers")

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ce_dynamics.files import atomic_path
from ce_dynamics.runs.pinning import EVAL_SEED, is_pinned_source, pinned_documents

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
SOURCES = ("stdlib", "pydoc_topics", "file", "hf")


# ---------------------------------------------------------------------------------------------- corpora


@functools.lru_cache(maxsize=1)
def _stdlib_files() -> tuple[Path, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return tuple(sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts))


def stdlib_documents(split: str) -> list[str]:
    """The standard library's `.py` files of one split ("train" or "eval": 1 file in 10, by path hash)."""
    if split not in ("train", "eval"):
        raise ValueError(f"stdlib split must be 'train' or 'eval', got {split!r}")
    return list(_stdlib_texts(split))


@functools.lru_cache(maxsize=2)
def _stdlib_texts(split: str) -> tuple[str, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    in_eval = [zlib.crc32(p.relative_to(root).as_posix().encode()) % 10 == 0 for p in _stdlib_files()]
    return tuple(p.read_text(encoding="utf-8", errors="replace")
                 for p, is_eval in zip(_stdlib_files(), in_eval) if is_eval == (split == "eval"))


def pydoc_topics_documents() -> list[str]:
    """English prose of the Python reference manual, one document per `pydoc_data.topics` entry."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def file_documents(path: str, field: str = "text") -> list[str]:
    """A local `.jsonl` file (one document per line, text under `field`) or any other file as one text."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"eval/train source file not found: {p}")
    if p.suffix != ".jsonl":
        return [p.read_text(encoding="utf-8", errors="replace")]
    docs = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                record = json.loads(line)
                if field not in record:
                    raise KeyError(f"{p}:{lineno} has no field {field!r} (keys: {sorted(record)})")
                docs.append(record[field])
    return docs


def hf_documents(path: str, name: str | None = None, split: str = "train", field: str = "text",
                 data_files: Any = None, seed: int = EVAL_SEED) -> Iterator[str]:
    """Stream a Hugging Face dataset, shuffled with `seed` (buffered), yielding the `field` of each row."""
    import datasets

    ds = datasets.load_dataset(path, name, split=split, data_files=data_files, streaming=True)
    for row in ds.shuffle(seed=seed, buffer_size=10_000):
        yield row[field]


def documents(spec: Mapping[str, Any], split: str = "eval") -> Iterable[str]:
    """Documents of one source spec (`source` plus its fields), already in the seed-42 order."""
    source = spec.get("source")
    if source == "hf":
        return hf_documents(spec["path"], spec.get("name"), spec.get("split", "train"), spec.get("field", "text"),
                            spec.get("data_files"))
    if source == "stdlib":
        docs = stdlib_documents(split)
    elif source == "pydoc_topics":
        docs = pydoc_topics_documents()
    elif source == "file":
        if not spec.get("path"):
            raise ValueError("source 'file' needs a path (a .jsonl with a text field, or a text file)")
        docs = file_documents(spec["path"], spec.get("field", "text"))
    else:
        raise ValueError(f"unknown data source {source!r}; expected one of {', '.join(SOURCES)}")
    random.Random(EVAL_SEED).shuffle(docs)
    return docs


def corpus_id(spec: Mapping[str, Any], split: str) -> str:
    """A string naming a corpus exactly (source, files, Python version), for cache keys."""
    key = {k: spec[k] for k in sorted(spec) if spec[k] is not None}
    if spec.get("source") in ("stdlib", "pydoc_topics"):
        key["python"] = sys.version.split()[0]
    return json.dumps({"split": split, **key}, sort_keys=True, default=str)


# ------------------------------------------------------------------------------------------- tokenizers


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, cache_dir: str | os.PathLike, key: str):
    """A byte-level BPE (GPT-NeoX style) trained on `texts`, cached under `cache_dir` by `key` + vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    digest = hashlib.sha256(f"{key}|vocab={vocab_size}".encode()).hexdigest()[:16]
    path = Path(cache_dir).expanduser() / "tokenizers" / f"bpe-{vocab_size}-{digest}.json"
    if not path.exists():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        with atomic_path(path) as tmp:
            tok.save(str(tmp))
        log.info("trained BPE tokenizer (%d tokens) -> %s", tok.get_vocab_size(), path)
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS, model_max_length=sys.maxsize)


def take_chars(docs: Iterable[str], max_chars: int | None) -> list[str]:
    """Leading documents of `docs` holding about `max_chars` characters (all with None)."""
    out, total = [], 0
    for doc in docs:
        if max_chars is not None and total >= max_chars:
            break
        out.append(doc)
        total += len(doc)
    return out


def pack(docs: Iterable[str], tokenizer: Any, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Tokenize `docs` in order, join with EOS, cut into windows of `seq_len`: int64 [n, seq_len]."""
    backend = tokenizer.backend_tokenizer
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer needs an eos_token to separate documents")
    buffer: list[int] = []
    windows: list[torch.Tensor] = []
    for doc in docs:
        buffer.extend(backend.encode(doc, add_special_tokens=False).ids)
        buffer.append(eos)
        while len(buffer) >= seq_len and (max_windows is None or len(windows) < max_windows):
            windows.append(torch.tensor(buffer[:seq_len], dtype=torch.int64))
            del buffer[:seq_len]
        if max_windows is not None and len(windows) >= max_windows:
            break
    if not windows:
        return torch.empty(0, seq_len, dtype=torch.int64)
    return torch.stack(windows)


def document_instances(docs: Iterable[str], tokenizer: Any, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One instance per document: its first `seq_len` tokens, right-padded. Returns int64 `input_ids` and
    `attention_mask` ([n, seq_len]; 0 marks padding, which `CausalLMModule` does not score)."""
    backend = tokenizer.backend_tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer needs a pad or eos token to pad short documents")
    rows, masks = [], []
    for doc in docs:
        ids = backend.encode(doc, add_special_tokens=False).ids[:seq_len]
        rows.append(ids + [pad] * (seq_len - len(ids)))
        masks.append([1] * len(ids) + [0] * (seq_len - len(ids)))
    if not rows:
        return torch.empty(0, seq_len, dtype=torch.int64), torch.empty(0, seq_len, dtype=torch.int64)
    return torch.tensor(rows, dtype=torch.int64), torch.tensor(masks, dtype=torch.int64)


# ------------------------------------------------------------------------------------------ datamodule


class TokenWindows(Dataset):
    """Rows of an int64 [n, seq_len] tensor as `{"input_ids": ...}` samples (plus `attention_mask` if given, and
    with `instance_ids`, the row's index as `"instance_ids"`: the eval instance id the bootstrap resamples by)."""

    def __init__(self, windows: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 instance_ids: bool = False) -> None:
        self.windows = windows
        self.attention_mask = attention_mask
        self.instance_ids = instance_ids

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        sample = {"input_ids": self.windows[idx]}
        if self.attention_mask is not None:
            sample["attention_mask"] = self.attention_mask[idx]
        if self.instance_ids:
            sample["instance_ids"] = torch.tensor(idx, dtype=torch.int64)
        return sample


class ResumableRandomSampler(DistributedSampler):
    """One seeded random order per epoch (``seed``, epoch) over all ranks, that can start part-way through an epoch.

    The world walks the order together: rank ``r`` of ``num_replicas`` takes positions ``r, r + num_replicas, ...``
    (as torch's ``DistributedSampler`` does), so one global batch holds ``batch_size x num_replicas`` consecutive
    samples of the order. ``skip()`` is asked at the start of every pass for how many samples of this epoch the whole
    world already consumed, so a run resumed from a mid-epoch checkpoint sees on every rank exactly the batches an
    uninterrupted run would have seen next. A ``DistributedSampler``, so Lightning uses it as it is under DDP (it
    would otherwise wrap it in a sampler that assumes every pass has the full length); ``set_epoch`` is Lightning's.
    The tail of an epoch that does not fill every rank equally is dropped.
    """

    def __init__(self, num_samples: int, seed: int, skip: Any = None, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.num_samples_total = num_samples
        self._skip = skip

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.num_samples_total,
                               generator=torch.Generator().manual_seed(self.seed + 7919 * self.epoch))
        start = int(self._skip()) if self._skip is not None else 0
        usable = self.num_samples_total - self.num_samples_total % self.num_replicas
        return iter(order[start + self.rank:usable:self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples_total // self.num_replicas  # a full epoch; a resumed pass stops early


class CEDataModule(L.LightningDataModule):
    """Training windows plus one validation dataloader per named eval set (`eval_names`, same order).

    With `cache_dir`, eval sets from `datasets` are pinned there (see `ce_dynamics.runs.pinning`). After `setup`:
    `eval_bytes[name]` is the number of UTF-8 bytes of the text the evaluated target tokens decode to (for
    bits per byte), `eval_hashes[name]` the pin's content hash (None for built-in and file sources).
    """

    def __init__(self, tokenizer: Any, eval_specs: Mapping[str, Mapping[str, Any]], seq_len: int = 128,
                 eval_sequences: int = 64, batch_size: int = 16, train_spec: Mapping[str, Any] | None = None,
                 train_max_chars: int | None = None, num_workers: int = 0, seed: int = 0,
                 cache_dir: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.cache_dir = cache_dir
        self.eval_bytes: dict[str, int] = {}
        self.eval_hashes: dict[str, str | None] = {}
        if not eval_specs:
            raise ValueError("at least one eval set is needed")
        self.tokenizer = tokenizer
        self.eval_specs = {name: dict(spec) for name, spec in eval_specs.items()}
        self.eval_names = list(self.eval_specs)
        self.train_spec = dict(train_spec) if train_spec else None
        self.seq_len, self.eval_sequences, self.batch_size = seq_len, eval_sequences, batch_size
        self.train_max_chars, self.num_workers, self.seed = train_max_chars, num_workers, seed
        self.train_set: TokenWindows | None = None
        self.eval_sets: dict[str, TokenWindows] = {}
        self._world_size: int | None = None  # of the training, once known (kept in checkpoints)

    def setup(self, stage: str | None = None) -> None:
        if not self.eval_sets:
            for name, spec in self.eval_specs.items():
                self.eval_sets[name] = self._eval_set(name, spec)
            self._count_bytes()
        if stage in (None, "fit") and self.train_set is None:
            if self.train_spec is None:
                raise ValueError("training needs a train source (data.train)")
            docs = take_chars(documents(self.train_spec, "train"), self.train_max_chars)
            self.train_set = TokenWindows(pack(docs, self.tokenizer, self.seq_len))
            if len(self.train_set) == 0:
                raise ValueError(f"training corpus has fewer than seq_len={self.seq_len} tokens")

    def _eval_set(self, name: str, spec: Mapping[str, Any]) -> TokenWindows:
        if self.cache_dir is not None and is_pinned_source(spec):
            pin = pinned_documents(spec, EVAL_SEED, self.eval_sequences, self.cache_dir, name=name)
            self.eval_hashes[name] = pin.hash
            ids, mask = document_instances(pin.documents, self.tokenizer, self.seq_len)
            if len(ids) < self.eval_sequences:
                log.warning("eval set %r has only %d documents (asked for %d)", name, len(ids), self.eval_sequences)
            return TokenWindows(ids, mask, instance_ids=True)
        self.eval_hashes[name] = None
        windows = pack(documents(spec, "eval"), self.tokenizer, self.seq_len, self.eval_sequences)
        if len(windows) == 0:
            raise ValueError(f"eval set {name!r} has fewer than seq_len={self.seq_len} tokens")
        if len(windows) < self.eval_sequences:
            log.warning("eval set %r has only %d instances of %d tokens (asked for %d)",
                        name, len(windows), self.seq_len, self.eval_sequences)
        return TokenWindows(windows, instance_ids=True)

    def _count_bytes(self) -> None:
        from ce_dynamics.bpb import target_bytes, token_byte_lengths

        try:
            lengths = token_byte_lengths(self.tokenizer)
        except Exception as err:  # noqa: BLE001 - a tokenizer we cannot read: no bits per byte, not no run
            log.warning("cannot count the bytes of this tokenizer's tokens (%r): no bits per byte", err)
            return
        for name, dataset in self.eval_sets.items():
            num_bytes = target_bytes(dataset.windows, lengths, dataset.attention_mask)
            if num_bytes > 0:
                self.eval_bytes[name] = num_bytes

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if self._world_size is not None and self._world_size != world:
            raise ValueError(f"this run was started on {self._world_size} processes (devices x num_nodes) and "
                             f"is resumed on {world}: resume it with the world size it was started with")
        self._world_size = world
        sampler = ResumableRandomSampler(len(self.train_set), self.seed, skip=self._consumed_samples,
                                         num_replicas=world, rank=rank)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers)

    def _consumed_samples(self) -> int:
        """Samples of the current epoch the whole world already trained on (0 at an epoch's start)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        return batches * self.batch_size * trainer.world_size  # each rank's batches come from one order

    def state_dict(self) -> dict[str, Any]:
        """The world size the run trains on, so a resume on another one is refused instead of reading wrong data."""
        return {"world_size": self._world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._world_size = state_dict.get("world_size")

    def val_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(self.eval_sets[name]) for name in self.eval_names]

    def _eval_loader(self, dataset: TokenWindows) -> DataLoader:
        sampler = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every instance exactly once across ranks (Lightning's default sampler pads with repeats,
            # which would count some tokens twice in the decomposition).
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)
