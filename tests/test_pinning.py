"""Pinned eval instances (ce_dynamics.runs.pinning): drawn once from a local HF-format dataset (the real `datasets`
json/parquet builders over files in a temp dir), written to data.cache_dir, read back after the source is gone;
`mode=prepare`; a missing pin offline is refused before any model is loaded."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from ce_dynamics.runs import data, pinning

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

TEXTS = [f"Document {i} says " + " ".join(f"w{i}x{j}" for j in range(4 + i % 9)) + "." for i in range(60)]


def write_dataset(folder: Path, fmt: str = "json") -> dict:
    """A local dataset of TEXTS in `fmt`, as an `hf` eval spec."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        path = folder / "docs.jsonl"
        path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "docs.parquet"
        pq.write_table(pa.table({"text": TEXTS, "id": list(range(len(TEXTS)))}), path)
    return {"source": "hf", "path": fmt, "data_files": str(path), "split": "train", "field": "text"}


def sha256_of(documents: list[str]) -> str:
    """The pin's content hash, written from its definition: SHA-256 over length-prefixed UTF-8 documents."""
    h = hashlib.sha256()
    for doc in documents:
        raw = doc.encode()
        h.update(len(raw).to_bytes(8, "little") + raw)
    return h.hexdigest()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = data.take_chars(data.documents({"source": "stdlib"}, "train"), 60_000)
    return data.train_bpe_tokenizer(texts, 300, tmp_path_factory.mktemp("tok"), key="pinning-test")


@pytest.mark.parametrize("fmt", ["json", "parquet"])
def test_drawn_once_pinned_and_reused_after_the_source_is_deleted(tmp_path: Path, fmt: str) -> None:
    spec = write_dataset(tmp_path / "src", fmt)
    cache = tmp_path / "cache"
    pin = pinning.pinned_documents(spec, 42, 10, cache, name="mine")
    assert pin.path.exists() and pin.path.parent == cache / "eval_pins"
    assert len(pin.documents) == 10 == len(set(pin.documents)) and set(pin.documents) <= set(TEXTS)
    assert pin.documents != TEXTS[:10]  # shuffled, not the file's head
    assert pin.hash == sha256_of(pin.documents)
    header = json.loads(pin.path.read_text().splitlines()[0])
    assert header["key"]["seed"] == 42 and header["key"]["count"] == 10 and header["hash"] == pin.hash

    if fmt == "json":  # (each parquet draw costs 5 s: datasets' streaming reader waits for its prefetch thread)
        other_seed = pinning.pinned_documents(spec, 43, 10, cache, name="mine")
        more = pinning.pinned_documents(spec, 42, 12, cache, name="mine")
        assert other_seed.hash != pin.hash and other_seed.path != pin.path
        assert more.path != pin.path and more.documents[:10] == pin.documents  # same shuffle, two more documents

    Path(spec["data_files"]).unlink()
    again = pinning.pinned_documents(spec, 42, 10, cache, name="mine")
    assert again.documents == pin.documents and again.hash == pin.hash
    with pytest.raises(pinning.MissingPinError, match="eval set 'mine' .*seed 44.*mode=prepare"):
        pinning.pinned_documents(spec, 44, 10, cache, name="mine")  # a new draw needs the source


def test_a_damaged_pin_is_refused(tmp_path: Path) -> None:
    spec = write_dataset(tmp_path / "src")
    pin = pinning.pinned_documents(spec, 42, 5, tmp_path / "cache")
    lines = pin.path.read_text().splitlines()
    lines[2] = json.dumps({"text": "edited by hand"})
    pin.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="damaged"):
        pinning.pinned_documents(spec, 42, 5, tmp_path / "cache")


def test_missing_pin_offline_is_refused_before_any_model_loads(tmp_path: Path, capsys) -> None:
    """The paper's Wikipedia set, offline (conftest sets HF_DATASETS_OFFLINE=1), nothing pinned: exit 2 at once
    with one line naming the set and the command. A replay that got as far as loading EleutherAI/pythia-160m
    (not cached here) would exit 1 with a load failure instead."""
    assert pinning.offline()
    out = tmp_path / "out"
    start = time.perf_counter()
    code = train.main(["experiment=paper_fig4", f"output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert code == 2 and time.perf_counter() - start < 30
    (line,) = err.strip().splitlines()
    assert "eval set 'wikipedia'" in line and "wikimedia/wikipedia" in line
    assert "python train.py mode=prepare experiment=paper_fig4" in line and "offline" in line
    assert not out.exists()
    assert train.main(["experiment=paper_fig4", "mode=prepare", f"data.cache_dir={tmp_path / 'cache'}"]) == 2
    assert "mode=prepare experiment=paper_fig4" in capsys.readouterr().err


def test_prepare_prints_the_pins_and_the_datamodule_reads_them(tmp_path: Path, tokenizer, capsys) -> None:
    spec = write_dataset(tmp_path / "src")
    cache = tmp_path / "cache"
    args = ["experiment=tiny", "data.eval.local.source=hf", "data.eval.local.path=json",
            f"data.eval.local.data_files={spec['data_files']}", "data.eval_sets=[local,prose]",
            "data.eval_sequences=8", f"data.cache_dir={cache}"]
    assert train.main(["mode=prepare", *args]) == 0
    printed = capsys.readouterr().out
    (pin_file,) = (cache / "eval_pins").iterdir()
    assert f"local: {pin_file} (8 documents, sha256 " in printed and str(cache / "eval_pins") in printed
    pin = pinning.read_pin(pin_file)

    Path(spec["data_files"]).unlink()  # from here on, only the pin has the text
    lengths = sorted(len(tokenizer(doc, add_special_tokens=False)["input_ids"]) for doc in pin.documents)
    seq_len = lengths[4]  # some documents are cut to seq_len, some are padded
    assert lengths[0] < seq_len < lengths[-1]
    dm = data.CEDataModule(tokenizer, {"local": spec, "prose": {"source": "pydoc_topics"}}, seq_len=seq_len,
                           eval_sequences=8, batch_size=4, cache_dir=cache)
    dm.setup("validate")
    assert dm.eval_hashes == {"local": pin.hash, "prose": None}
    local = dm.eval_sets["local"]
    assert local.windows.shape == (8, seq_len) == local.attention_mask.shape
    for row, mask, doc in zip(local.windows, local.attention_mask, pin.documents):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"][:seq_len]  # one instance per document
        assert row[: len(ids)].tolist() == ids and mask.tolist() == [1] * len(ids) + [0] * (seq_len - len(ids))
    batch = next(iter(dm.val_dataloader()[0]))
    assert set(batch) == {"input_ids", "attention_mask", "instance_ids"}  # the id: the instance's index in its set
    assert batch["instance_ids"].tolist() == list(range(len(batch["input_ids"])))


def test_padding_of_short_documents_is_not_scored(tokenizer) -> None:
    from ce_dynamics.runs.module import CausalLMModule

    docs = ["a b", "a much longer document than the other one"]
    ids, mask = data.document_instances(docs, tokenizer, 10)
    module = CausalLMModule(model_config=dict(vocab_size=300, hidden_size=16, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=32,
                                              max_position_embeddings=16))
    out = module.validation_step({"input_ids": ids, "attention_mask": mask}, 0)
    scored = out["labels"] != -100
    assert torch.equal(scored, mask[:, 1:].bool())
    lengths = [min(10, len(tokenizer(doc, add_special_tokens=False)["input_ids"])) for doc in docs]
    assert lengths[0] < 10 and scored.sum(1).tolist() == [n - 1 for n in lengths]  # first token is no target
