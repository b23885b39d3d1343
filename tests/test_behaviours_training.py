"""Training behaviours: AdamW's groups (no weight decay on biases and norms) and the learning rate at warmup's
end and at max_steps in a real fit, against the closed form; a sweep rerun retrains nothing and writes no
row twice."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from ce_dynamics.runs.module import CausalLMModule

LR, MIN_RATIO, WARMUP, MAX_STEPS, DECAY = 0.1, 0.1, 3, 10, 0.05


class RecordLR(L.Callback):
    """The learning rate each optimizer step uses (read before the step)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_optimizer_groups_and_the_schedule_in_a_real_fit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    shape = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                 max_position_embeddings=32)
    module = CausalLMModule(model_config=shape, lr=LR, min_lr_ratio=MIN_RATIO, warmup_steps=WARMUP,
                            weight_decay=DECAY)
    batches = [{"input_ids": torch.randint(0, 64, (2, 9))} for _ in range(MAX_STEPS)]
    record = RecordLR()
    trainer = L.Trainer(accelerator="cpu", max_steps=MAX_STEPS, callbacks=[record], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(batches, batch_size=None))

    # linear warmup to LR over WARMUP steps, then cosine to MIN_RATIO * LR at MAX_STEPS, by hand
    def closed_form(step: int) -> float:
        if step < WARMUP:
            return LR * (step + 1) / WARMUP
        return LR * (MIN_RATIO + (1 - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (MAX_STEPS - WARMUP))))

    assert record.lrs == pytest.approx([closed_form(s) for s in range(MAX_STEPS)], rel=1e-12)
    assert record.lrs[WARMUP - 1] == pytest.approx(LR) and record.lrs[WARMUP] == pytest.approx(LR)  # warmup's end
    optimizer = trainer.optimizers[0]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(MIN_RATIO * LR, rel=1e-12)  # at max_steps

    names = {id(p): n for n, p in module.named_parameters()}
    by_decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    no_decay = {n for n in names.values() if n.endswith(".bias") or "layernorm" in n or "layer_norm" in n}
    assert no_decay and by_decay[0.0] == no_decay
    assert by_decay[DECAY] == set(names.values()) - no_decay
    embeddings = (module.model.get_input_embeddings().weight, module.model.get_output_embeddings().weight)
    assert {names[id(p)] for p in embeddings} <= by_decay[DECAY]


def test_a_sweep_rerun_retrains_nothing_and_writes_no_row_twice(tmp_path: Path) -> None:
    from ce_dynamics.analysis.scaling import load_results
    from ce_dynamics.runs.sweep import run_sweep_rows

    out = tmp_path / "sweep"
    argv = [f"output_dir={out}", f"data.cache_dir={tmp_path / 'tokenizers'}", "model.vocab_size=320",
            "model.max_position_embeddings=32", "data.seq_len=16", "data.eval_sequences=4", "data.batch_size=4",
            "data.tokenizer_train_chars=30000", "data.train.max_chars=30000", "trainer.max_steps=2",
            "trainer.val_check_interval=2", "optim.warmup_steps=1"]
    sizes = [(16, 1), (24, 2)]
    path = run_sweep_rows(argv, sizes=sizes)
    rows = load_results(path)
    # GPT-NeoX per layer 12h^2 + 13h (attention, MLP 4h, two LayerNorms), plus the final LayerNorm's 2h
    expected = {(f"tiny-neox-h{h}-l{n}", d): n * (12 * h * h + 13 * h) + 2 * h for h, n in sizes for d in ("code", "prose")}
    assert {(r["model"], r["dataset"]): r["non_embedding_params"] for r in rows} == expected
    assert len(rows) == len(expected)
    assert {(r["step"], r["num_tokens"]) for r in rows} == {(2, 4 * 15)}
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".ckpt", ".npz")}
    assert len([p for p in stamps if p.suffix == ".npz"]) == 2 * 2 * 2  # members x eval sets x (step 0, step 2)
    before = path.read_bytes()

    assert run_sweep_rows(argv, sizes=sizes) == path  # everything done: nothing trained, nothing written
    assert path.read_bytes() == before
    # interrupted after the first member's rows: the rerun adds the second member's, trains nothing
    first = [json.dumps(r) + "\n" for r in rows if r["model"] == "tiny-neox-h16-l1"]
    path.write_text("".join(first))
    run_sweep_rows(argv, sizes=sizes)
    again = load_results(path)
    assert sorted((r["model"], r["dataset"]) for r in again) == sorted(expected)  # no row twice
    assert again == rows
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # no checkpoint or array rewritten
