"""Corpora, the seed-42 sampling protocol, the cached BPE tokenizer, sources (file, HF datasets on a local file)
and CausalLMModule (aligned validation outputs, schedule, from_pretrained)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from ce_dynamics.runs import data
from ce_dynamics.runs.module import CausalLMModule, cosine_with_warmup

SHAPE = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    texts = data.take_chars(data.documents({"source": "stdlib"}, "train"), 100_000)
    return data.train_bpe_tokenizer(texts, 300, tmp_path_factory.mktemp("cache"), key="stdlib-test")


def test_stdlib_split_by_file_is_disjoint_and_about_one_in_ten():
    train, held_out = data.stdlib_documents("train"), data.stdlib_documents("eval")
    assert len(train) + len(held_out) == len(data._stdlib_files())  # every file in exactly one split
    assert 0.05 < len(held_out) / (len(train) + len(held_out)) < 0.15
    assert data.stdlib_documents("eval") == held_out  # by path, so the same on every run
    with pytest.raises(ValueError, match="'train' or 'eval'"):
        data.stdlib_documents("test")


def test_documents_are_shuffled_with_seed_42():
    base = data.pydoc_topics_documents()
    expected = list(base)
    random.Random(42).shuffle(expected)
    assert list(data.documents({"source": "pydoc_topics"})) == expected
    with pytest.raises(ValueError, match="unknown data source 'web'.*stdlib, pydoc_topics, file, hf"):
        data.documents({"source": "web"})


def test_bpe_tokenizer_is_cached_by_key_and_vocab_size(tmp_path):
    texts = ["def f(x):\n    return x + 1\n" * 50, "class A:\n    pass\n" * 50]
    first = data.train_bpe_tokenizer(texts, 280, tmp_path, key="k")
    files = list((tmp_path / "tokenizers").glob("*.json"))
    assert len(files) == 1 and len(first) <= 280
    stamp = files[0].stat().st_mtime_ns
    again = data.train_bpe_tokenizer(["completely different text"], 280, tmp_path, key="k")
    assert files[0].stat().st_mtime_ns == stamp and again.get_vocab() == first.get_vocab()
    data.train_bpe_tokenizer(texts, 290, tmp_path, key="k")
    data.train_bpe_tokenizer(texts, 280, tmp_path, key="other")
    assert len(list((tmp_path / "tokenizers").glob("*.json"))) == 3
    assert first.decode(first.encode("def g(y): pass")) == "def g(y): pass"  # byte-level: lossless


def test_pack_joins_documents_with_eos_and_keeps_the_first_windows(tokenizer):
    docs = ["import os\n", "x = 1\n" * 20, "print(x)\n"]
    ids = [tokenizer.backend_tokenizer.encode(d, add_special_tokens=False).ids for d in docs]
    stream = [t for doc in ids for t in (*doc, tokenizer.eos_token_id)]
    windows = data.pack(docs, tokenizer, seq_len=8)
    assert windows.dtype == torch.int64 and windows.shape == (len(stream) // 8, 8)
    assert windows.flatten().tolist() == stream[: windows.numel()]
    assert torch.equal(data.pack(docs, tokenizer, seq_len=8, max_windows=2), windows[:2])


def test_file_sources_jsonl_text_and_hf_datasets_on_a_local_file(tmp_path, tokenizer):
    rows = [{"text": f"document number {i} " * (3 + i % 4), "id": i} for i in range(40)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shuffled = [r["text"] for r in rows]
    random.Random(42).shuffle(shuffled)
    assert list(data.documents({"source": "file", "path": str(jsonl)})) == shuffled
    text = tmp_path / "notes.txt"
    text.write_text("some prose\nmore prose\n")
    assert list(data.documents({"source": "file", "path": str(text)})) == ["some prose\nmore prose\n"]
    with pytest.raises(KeyError, match="no field 'body'"):
        data.documents({"source": "file", "path": str(jsonl), "field": "body"})
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        data.documents({"source": "file", "path": str(tmp_path / "missing.jsonl")})

    hf = list(data.documents({"source": "hf", "path": "json", "data_files": str(jsonl), "split": "train"}))
    assert sorted(hf) == sorted(r["text"] for r in rows) and hf != [r["text"] for r in rows]  # all, shuffled
    again = list(data.documents({"source": "hf", "path": "json", "data_files": str(jsonl), "split": "train"}))
    assert again == hf  # seed 42: the same sample every time


def test_datamodule_one_val_loader_per_eval_set_in_order(tokenizer, tmp_path):
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("".join(json.dumps({"text": "alpha beta gamma " * 30}) + "\n" for _ in range(5)))
    dm = data.CEDataModule(tokenizer, {"prose": {"source": "pydoc_topics"}, "mine": {"source": "file", "path": str(jsonl)}},
                           seq_len=16, eval_sequences=6, batch_size=4)
    dm.setup("validate")
    assert dm.eval_names == ["prose", "mine"] and dm.train_set is None
    loaders = dm.val_dataloader()
    assert [len(loader.dataset) for loader in loaders] == [6, 6]
    first = next(iter(loaders[0]))["input_ids"]
    assert first.shape == (4, 16)
    assert torch.equal(dm.eval_sets["prose"].windows, data.pack(data.documents({"source": "pydoc_topics"}), tokenizer, 16, 6))
    with pytest.raises(ValueError, match="needs a train source"):
        dm.setup("fit")


def test_validation_step_returns_aligned_logits_and_labels():
    torch.manual_seed(0)
    module = CausalLMModule(model_config=SHAPE)
    ids = torch.randint(0, 300, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    out = module.validation_step({"input_ids": ids, "attention_mask": mask}, 0)
    assert out["logits"].shape == (2, 9, 300) and out["labels"].shape == (2, 9)
    assert torch.equal(out["labels"][0], ids[0, 1:])  # label t is the token after position t
    assert out["labels"][1, 6:].eq(-100).all() and torch.equal(out["labels"][1, :6], ids[1, 1:7])
    with torch.no_grad():
        full = module.model(input_ids=ids).logits
    assert torch.allclose(out["logits"], full[:, :-1])
    expected = torch.nn.functional.cross_entropy(full[:, :-1].flatten(0, 1), out["labels"].flatten())
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_module_needs_exactly_one_model_source_and_loads_from_pretrained(tmp_path):
    with pytest.raises(ValueError, match="exactly one of model_config"):
        CausalLMModule()
    with pytest.raises(ValueError, match="dtype must be one of"):
        CausalLMModule(model_config=SHAPE, dtype="float8")
    source = CausalLMModule(model_config=SHAPE)
    source.model.save_pretrained(tmp_path / "saved")
    loaded = CausalLMModule(hub_id=str(tmp_path / "saved"), dtype="bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    ids = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).float(), source(ids), atol=0.05)


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    values = [cosine_with_warmup(s, warmup_steps=10, total_steps=110, min_ratio=0.1) for s in range(120)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.55) and values[110] == pytest.approx(0.1) and values[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_training_order_is_one_seeded_permutation_dealt_to_the_ranks_and_resumes_part_way(world):
    n, seed, consumed = 23, 5, 0
    for epoch in (0, 1):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 * epoch)).tolist()
        usable = order[: n - n % world]  # every rank the same number of samples
        samplers = [data.ResumableRandomSampler(n, seed, skip=lambda: consumed, num_replicas=world, rank=r)
                    for r in range(world)]
        for sampler in samplers:
            sampler.set_epoch(epoch)
        assert [list(s) for s in samplers] == [usable[r::world] for r in range(world)]
        assert all(len(s) == n // world for s in samplers)
        consumed = 2 * world  # two batches of 1 on every rank are done: each rank goes on where it stood
        assert [list(s) for s in samplers] == [usable[2 * world + r::world] for r in range(world)]
        consumed = 0


def test_a_resume_on_another_world_size_is_refused(tokenizer, tmp_path):
    dm = data.CEDataModule(tokenizer, {"prose": {"source": "pydoc_topics"}}, seq_len=16, eval_sequences=2,
                           batch_size=2, train_spec={"source": "pydoc_topics"}, train_max_chars=20000)
    dm.setup("fit")
    dm.load_state_dict({"world_size": 2})  # the checkpoint of a 2-process run; here no trainer: 1 process
    with pytest.raises(ValueError, match="started on 2 processes .* resumed on 1: resume it with the world size"):
        dm.train_dataloader()
    dm.load_state_dict({})  # a checkpoint without the field (an earlier version) resumes as before
    assert len(dm.train_dataloader().sampler) == len(dm.train_set)
