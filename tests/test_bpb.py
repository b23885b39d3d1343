"""Bits per byte: token byte counts against the text itself, the conversion against F.cross_entropy, the
callback's `decomp/<set>/<key>_bpb` in a real train.py validation, and `python -m ce_dynamics.analysis --unit bpb`."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ce_dynamics.runs import data
from ce_dynamics.bpb import BPB_KEYS, bits_per_byte, target_bytes, token_byte_lengths
from ce_dynamics.functional import cross_entropy_decomposition

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

TEXT = "Größe über 3€ — naïve café, ☃ and 𝄞.\n    def f(x):\n        return x ** 2  # émoji 🙂\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = data.take_chars(data.documents({"source": "stdlib"}, "train"), 60_000)
    return data.train_bpe_tokenizer(texts, 300, tmp_path_factory.mktemp("tok"), key="bpb-test")


def test_token_bytes_add_up_to_the_utf8_bytes_of_the_text(tokenizer) -> None:
    lengths = token_byte_lengths(tokenizer)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > 20 and any(len(ch.encode()) == 4 for ch in TEXT)  # multi-byte characters split over tokens
    assert int(lengths[ids].sum()) == len(TEXT.encode("utf-8"))
    assert lengths[tokenizer.eos_token_id] == 0  # the EOS between packed documents is no text


def test_sentencepiece_style_byte_fallback_tokens_count_one_byte() -> None:
    """A Llama-2-style tokenizer (Metaspace, BPE with byte fallback), built in memory: `<0xNN>` is one byte and
    `▁` a space, so the tokens of a text hold its UTF-8 bytes plus the one dummy space put before it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["▁", "h", "l", "o", "w", "r", "d", "▁h", "ll", "▁w"]:
        vocab[piece] = len(vocab)
    model = models.BPE(vocab, [("▁", "h"), ("l", "l"), ("▁", "w")], byte_fallback=True, unk_token="<unk>")
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    text = "héllo wörld ☃"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert "<0xE2>" in tok.convert_ids_to_tokens(ids) and tok.decode(ids) == text
    lengths = token_byte_lengths(tok)
    assert int(lengths[ids].sum()) == len(text.encode("utf-8")) + 1
    assert lengths[tok.eos_token_id] == lengths[tok.bos_token_id] == 0


def test_target_bytes_of_packed_windows_are_the_bytes_their_targets_decode_to(tokenizer) -> None:
    docs = [f"line {i}: value = {i * i}\n" * (1 + i % 3) for i in range(30)]  # ASCII: every token decodes alone
    windows = data.pack(docs, tokenizer, seq_len=16)
    expected = sum(len(tokenizer.decode(w[1:].tolist(), skip_special_tokens=True).encode()) for w in windows)
    assert target_bytes(windows, token_byte_lengths(tokenizer)) == expected
    ids, mask = data.document_instances(docs[:6], tokenizer, 16)
    assert not mask.all()
    ids = ids.masked_fill(mask == 0, tokenizer.convert_tokens_to_ids("a"))  # as if padded with a real token
    expected = sum(len(tokenizer.decode(row[1:int(m.sum())].tolist()).encode()) for row, m in zip(ids, mask))
    assert target_bytes(ids, token_byte_lengths(tokenizer), mask) == expected  # padding counts nothing


def test_bits_per_byte_is_summed_cross_entropy_in_bits_over_bytes() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, 97, generator=gen, dtype=torch.float64) * 2
    target = torch.randint(0, 97, (3, 40), generator=gen)
    out = cross_entropy_decomposition(logits, target)
    num_bytes = 517
    bpb = bits_per_byte({k: float(v) for k, v in out.items() if v.dim() == 0}, num_bytes)
    assert set(bpb) == set(BPB_KEYS)
    total_bits = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item() / math.log(2)
    assert bpb["cross_entropy_bpb"] == pytest.approx(total_bits / num_bytes, rel=1e-12)
    identity = bpb["error_entropy_bpb"] + bpb["self_alignment_bpb"] - bpb["confidence_bpb"]
    assert bpb["cross_entropy_bpb"] == pytest.approx(identity, abs=1e-12)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="positive number of UTF-8 bytes"):
            bits_per_byte({**out, "num_tokens": 120}, bad)


def test_validation_logs_bits_per_byte_and_the_pin_hash(tmp_path: Path) -> None:
    """train.py, step-0 validation only: an ASCII file set and a pinned local json set. The bpb logged to CSV
    matches the module's own val/loss (F.cross_entropy) times tokens over the decoded bytes; the W&B run config
    carries the pin's hash."""
    from ce_dynamics.runs import pinning

    notes = tmp_path / "notes.txt"
    notes.write_text("".join(f"Note {i}: the value of item {i} is {i * 7 % 13}.\n" for i in range(200)))
    local = tmp_path / "docs.jsonl"
    local.write_text("".join(json.dumps({"text": f"Entry {i}. " + "Some words here. " * (2 + i % 5)}) + "\n"
                             for i in range(40)))
    out = tmp_path / "run"
    code = train.main([
        "experiment=tiny", f"output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=0",
        "model.vocab_size=300", "data.tokenizer_train_chars=60000", "model.hidden_size=32",
        "model.num_hidden_layers=1", "model.intermediate_size=64", "data.seq_len=24", "data.eval_sequences=6",
        "data.batch_size=6", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        f"data.eval.notes.source=file", f"data.eval.notes.path={notes}",
        "data.eval.local.source=hf", "data.eval.local.path=json", f"data.eval.local.data_files={local}",
        "data.eval_sets=[notes,local]", "logger.wandb.mode=offline",
    ])
    assert code == 0
    (metrics,) = out.glob("csv/*/metrics.csv")
    row = {k: float(v) for r in csv.DictReader(metrics.open()) for k, v in r.items() if v}  # step 0 only
    from ce_dynamics.runs.config import load_config
    from ce_dynamics.runs.training import build_datamodule, build_tokenizer

    cfg = load_config(["experiment=tiny", f"data.cache_dir={tmp_path / 'cache'}", "model.vocab_size=300",
                       "data.tokenizer_train_chars=60000", "data.seq_len=24", "data.eval_sequences=6",
                       f"data.eval.notes.source=file", f"data.eval.notes.path={notes}", "data.eval.local.source=hf",
                       "data.eval.local.path=json", f"data.eval.local.data_files={local}",
                       "data.eval_sets=[notes,local]"])
    tokenizer = build_tokenizer(cfg)
    dm = build_datamodule(cfg, tokenizer)
    dm.setup("validate")
    for name in ("notes", "local"):
        dataset = dm.eval_sets[name]
        masks = dataset.attention_mask if dataset.attention_mask is not None else torch.ones_like(dataset.windows)
        decoded = sum(len(tokenizer.decode(w[1:int(m.sum())].tolist(), skip_special_tokens=True).encode())
                      for w, m in zip(dataset.windows, masks))
        tokens = int((masks[:, 1:] == 1).sum())
        expected = row[f"val/loss/{name}"] * tokens / decoded / math.log(2)
        assert row[f"decomp/{name}/cross_entropy_bpb"] == pytest.approx(expected, rel=1e-5)
        parts = [row[f"decomp/{name}/{k}_bpb"] for k in ("error_entropy", "self_alignment", "confidence")]
        assert row[f"decomp/{name}/cross_entropy_bpb"] == pytest.approx(parts[0] + parts[1] - parts[2], abs=1e-9)
    (pin_file,) = (tmp_path / "cache" / "eval_pins").iterdir()
    (run_dir,) = out.glob("wandb/offline-run-*")
    records = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(run_dir)],
                             capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()
    (run,) = [json.loads(r)["run"] for r in records if json.loads(r).get("type") == "run"]
    assert run["config"]["update"]["eval_pins"] == {"local": pinning.read_pin(pin_file).hash}


def test_scaling_cli_fits_bits_per_byte(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Rows whose *_bpb follow exact power laws (and whose nats do not): --unit bpb recovers the bpb exponents."""
    rows = []
    for size in (1e6, 1e7, 1e8, 1e9):
        nats = {"cross_entropy": 3.0, "error_entropy": 2.5, "self_alignment": 0.7, "confidence": 0.2}
        bpb = {"cross_entropy_bpb": 2.0 * size**-0.1, "error_entropy_bpb": 1.5 * size**-0.12,
               "self_alignment_bpb": 0.6 * size**0.05, "confidence_bpb": 0.1 * size**-0.3}
        rows.append({"model": f"m{size:g}", "family": "toy", "dataset": "wiki", "step": 1,
                     "non_embedding_params": size, **nats, **bpb})
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from ce_dynamics.analysis import report

    assert report.main([str(results), "--unit", "bpb", "--out", str(tmp_path / "figs")]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    delta_at = next(i for i, line in enumerate(lines) if line.startswith("|Delta|"))
    assert lines[delta_at + 2].split() == ["toy", "0.0200*", "0.1500", "0.2000"]  # |alpha_M - alpha_CE|
    assert "bits per UTF-8 byte" in printed and (tmp_path / "figs" / "scaling_law_bpb.png").exists()
    assert report.main([str(results), "--no-figures"]) == 0  # in nats the rows are flat: CE and EE fit alpha 0
    assert capsys.readouterr().out.splitlines()[delta_at + 2].split()[0:2] == ["toy", "0.0000*"]
    del rows[0]["error_entropy_bpb"]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert report.main([str(results), "--unit", "bpb", "--no-figures"]) == 2
    assert "m1e+06 on wiki has no error_entropy_bpb" in capsys.readouterr().err
