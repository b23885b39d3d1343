"""Every config value that can be checked before building anything is checked: train.py exits 2 with one line
naming the key, the value and what is expected (sections kept sections, no sub-keys under plain values, AdamW's
beta range, Lightning's strategies/accelerators/devices forms, writable cache dir, each eval set once, the train
source's fields); and data.train.source=file trains on a user's text file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ce_dynamics.runs.config import ConfigError, load_config, preflight

ROOT = Path(__file__).resolve().parent.parent

# (command line, key the one line must name, words of what is expected)
CASES = [
    (["optim.betas=[0.9,1.0]"], "optim.betas", "< 1"),
    (["trainer.strategy=bogus"], "trainer.strategy", "registered strategies"),
    (["trainer.devices=abc"], "trainer.devices", "'0,1'"),
    (["data.cache_dir=/proc/nope"], "data.cache_dir", "not writable"),
    (["seed.x=1"], "seed.x", "no sub-keys"),
    (["trainer=null"], "trainer=null", "is a section"),
    (["model=5"], "model=5", "is a section"),
    (["mode.x=1"], "mode.x", "no sub-keys"),
    (["checkpoint.keep.x=1"], "checkpoint.keep.x", "no sub-keys"),
    (["data.eval_sets=[code,code]"], "data.eval_sets", "each eval set once"),
    (["data.train.source=file"], "data.train.path=null", "a text or .jsonl file"),
    (["data.train.source=hf"], "data.train.path=null", "Hugging Face dataset id"),
    (["data.train.source=file", "data.train.path=/nonexistent/notes.txt"], "data.train.path", "no such file"),
]


@pytest.mark.parametrize(("argv", "key", "expected"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_train_py_refuses_with_exit_2_and_one_line_naming_the_key(argv, key, expected, tmp_path):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), f"output_dir={tmp_path / 'out'}", *argv],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - start
    print(f"{' '.join(argv)}: exit {proc.returncode} in {seconds:.2f} s")  # under 5 s on an idle machine
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("train.py: config error: "), proc.stderr
    assert key in lines[0] and expected in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def _refused(argv: list[str], tmp_path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        preflight(load_config([f"output_dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'cache'}", *argv]))
    return str(err.value)


@pytest.mark.parametrize(("argv", "message"), [
    (["optim.betas=[1.0,0.95]"], "optim.betas=[1.0, 0.95]: expected a list of 2 [a number >= 0 and < 1]"),
    (["optim.betas=[0.9,1.0]"], "optim.betas=[0.9, 1.0]: expected a list of 2 [a number >= 0 and < 1]"),
    (["optim.betas=[-0.1,0.95]"], "optim.betas=[-0.1, 0.95]: expected"),
    (["trainer.strategy=bogus"], "trainer.strategy='bogus': expected one of Lightning's registered strategies"),
    (["trainer.strategy=ddp_spwan"], "trainer.strategy='ddp_spwan': expected"),
    (["trainer.accelerator=gpuu"], "trainer.accelerator='gpuu': expected one of Lightning's accelerators"),
    (["trainer.devices=abc"], "trainer.devices='abc': expected"),
    (["trainer.devices='0,a'"], "trainer.devices='0,a': expected"),
    (["trainer.devices=-2"], "trainer.devices=-2: expected"),
    (["trainer.devices=[0,-1]"], r"trainer.devices=[0, -1]: expected"),
    (["seed.x=1"], "seed.x: seed is a plain value (an integer >= 0"),
    (["mode.x=1"], "mode.x: mode is a plain value (one of train, replay, sweep, prepare) and has no sub-keys"),
    (["checkpoint.keep.x=1"], "checkpoint.keep.x: checkpoint.keep is a plain value (one of last, all)"),
    (["trainer.max_steps.x=1"], "trainer.max_steps.x: trainer.max_steps is a plain value"),
    (["trainer.devices.x=1"], "trainer.devices.x: trainer.devices is a plain value"),
    (["trainer=null"], "trainer=null: trainer is a section; expected its keys, e.g. trainer."),
    (["model=5"], "model=5: model is a section; expected its keys, e.g. model.hub_id=<value>"),
    (["data.train=3"], "data.train=3: data.train is a section"),
    (["data.eval=5"], "data.eval=5: expected the catalog of eval sets"),
    (["logger.wandb=offline"], "logger.wandb='offline': logger.wandb is a section"),
    (["data.eval_sets=[code,code]"], "data.eval_sets=['code', 'code']: code named twice"),
    (["data.eval_sets=[code,prose,prose]"], "prose named twice"),
    (["data.cache_dir=/proc/nope"], "data.cache_dir=/proc/nope is not writable"),
    (["data.train.source=file"], "data.train.path=null: expected a text or .jsonl file for data.train.source=file"),
    (["data.train.source=hf"], "data.train.path=null: expected a Hugging Face dataset id"),
    (["data.train.source=file", "data.train.path=/nonexistent/a.txt"], "data.train.path=/nonexistent/a.txt: no such"),
    (["data.train.field=5"], "data.train.field=5: expected a non-empty string, or null"),
    (["data.eval.mine.source=file", "data.eval.mine.path=/nonexistent/m.jsonl", "data.eval_sets=[mine]"],
     "data.eval.mine.path=/nonexistent/m.jsonl: no such file"),
])
def test_each_rule_refuses_each_bad_value(argv, message, tmp_path):
    assert message in _refused(argv, tmp_path)


def test_a_cache_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "a_file").write_text("")
    assert "data.cache_dir=" in _refused([f"data.cache_dir={tmp_path / 'a_file' / 'cache'}"], tmp_path)


@pytest.mark.parametrize("argv", [
    ["optim.betas=[0.0,0.999]"], ["trainer.strategy=ddp_find_unused_parameters_true"], ["trainer.strategy=fsdp"],
    ["trainer.strategy=deepspeed_stage_2"], ["trainer.accelerator=gpu"], ["trainer.accelerator=tpu"],
    ["trainer.devices=auto"], ["trainer.devices='0,1'"], ["trainer.devices='1'"], ["trainer.devices='-1'"],
    ["trainer.devices=[0,1]"], ["data.eval_sets=[prose,code]"],
])
def test_values_lightning_and_torch_take_are_accepted(argv, tmp_path):
    preflight(load_config([f"output_dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'cache'}", *argv]))


def test_the_names_read_from_lightnings_source_are_its_registries():
    """Strategies and accelerators read with ast (no import) are exactly Lightning's registries plus the
    connector's aliases; a name outside them is one Lightning's Trainer refuses."""
    import lightning as L
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    from ce_dynamics.runs.config_schema import lightning_registry

    assert lightning_registry("strategies") == {*StrategyRegistry.available_strategies(), "auto"}
    assert lightning_registry("accelerators") == {*AcceleratorRegistry.available_accelerators(), "auto", "gpu"}
    for key, name in (("strategy", "bogus"), ("accelerator", "gpuu")):
        with pytest.raises(ValueError, match=name):
            L.Trainer(**{key: name}, logger=False)


@pytest.mark.slow
def test_train_source_file_trains_on_a_users_text_file(tmp_path):
    """data.train.source=file data.train.path=notes.txt: the BPE and the training windows come from that file."""
    import json

    from test_train_e2e import small

    notes = tmp_path / "notes.txt"
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    rng = np.random.default_rng(0)
    notes.write_text("\n".join(" ".join(rng.choice(words, 12)) + "." for _ in range(3000)), encoding="utf-8")
    out, cache = tmp_path / "out", tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *small(out, cache), "trainer.max_steps=2",
         "data.train.source=file", f"data.train.path={notes}", "logger.wandb.mode=disabled", "data.eval_sets=[prose]"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in (out / "arrays" / "prose").iterdir()) == ["step_0.npz", "step_2.npz"]
    (tokenizer,) = (cache / "tokenizers").glob("bpe-384-*.json")
    vocab = json.loads(tokenizer.read_text())["model"]["vocab"]
    assert all(any(w in token for token in vocab) for w in ("alpha", "epsilon", "theta")), "BPE not from the file"


@pytest.mark.slow
def test_train_source_hf_reads_a_dataset_with_its_documented_keys(tmp_path, monkeypatch):
    """data.train.source=hf with path/split/field (a local JSON-lines dataset folder, offline): the tokenizer and
    the training windows come from it (it used to end in KeyError: 'path')."""
    import json

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    from ce_dynamics.runs.training import build_datamodule, build_tokenizer

    folder = tmp_path / "corpus"
    folder.mkdir()
    words = ["quokka", "axolotl", "pangolin", "narwhal"]
    rng = np.random.default_rng(1)
    with (folder / "train.jsonl").open("w") as fh:
        for _ in range(400):
            fh.write(json.dumps({"body": " ".join(rng.choice(words, 20)), "text": "unused"}) + "\n")
    cfg = load_config([f"output_dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'cache'}", "model.vocab_size=300",
                       "data.train.source=hf", f"data.train.path={folder}", "data.train.split=train",
                       "data.train.field=body", "data.tokenizer_train_chars=20000", "data.train.max_chars=20000",
                       "data.seq_len=16", "data.eval_sequences=2", "data.eval_sets=[prose]"])
    tokenizer = build_tokenizer(cfg)
    assert all(len(tokenizer(w, add_special_tokens=False)["input_ids"]) <= 2 for w in words)  # learnt from body
    datamodule = build_datamodule(cfg, tokenizer)
    datamodule.setup("fit")
    text = tokenizer.decode(datamodule.train_set.windows[0])
    assert any(w in text for w in words) and "unused" not in text
