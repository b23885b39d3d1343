"""Replay fits the hardware at hand: the pythia14m experiment (8 GPUs, DDP, bf16-mixed for training) replays on
this CPU machine with no trainer overrides, against the local hub cache; impossible trainer.* overrides are
refused once, up front; the end-of-run summary follows the walk."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest
from hub_cache import HubCache, offline_hub, tiny_hub  # noqa: F401 - tiny_hub is a fixture

from ce_dynamics.runs.config import load_config
from ce_dynamics.files import read_results
from ce_dynamics.runs.replay import command_line_keys, fit_hardware

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)


def args(hub: HubCache, out: Path) -> list[str]:
    return ["experiment=pythia14m", "mode=replay", f"output_dir={out}", f"replay.models=[{hub.hub_id}]",
            "replay.revisions=[4]", "data.seq_len=32", "data.eval_sequences=4", "data.batch_size=4",
            "data.eval_sets=[prose]", "logger.wandb.mode=disabled"]


def test_fit_hardware_replaces_only_what_the_command_line_did_not_give():
    cfg = load_config(["experiment=pythia14m", "mode=replay", "trainer.devices=2"])
    assert (cfg.trainer.accelerator, cfg.trainer.strategy) == ("gpu", "ddp")  # the experiment's training setup
    changed = fit_hardware(cfg, command_line_keys(["experiment=pythia14m", "mode=replay", "trainer.devices=2"]))
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.strategy) == ("auto", 2, "auto")
    assert changed == ["trainer.accelerator: gpu -> auto", "trainer.strategy: ddp -> auto"]


def test_pythia14m_replays_on_the_cpu_without_trainer_overrides(tiny_hub: HubCache, tmp_path: Path, capsys):
    out = tmp_path / "out"
    with offline_hub(tiny_hub.root):
        code = train.main(args(tiny_hub, out))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "trainer.accelerator: gpu -> auto" in captured.err and "trainer.devices: 8 -> 1" in captured.err
    (row,) = read_results(out / "results.jsonl")
    assert (row["model"], row["step"], row["dataset"]) == (tiny_hub.hub_id, 4, "prose")
    assert row["num_tokens"] == 4 * 31
    # the end-of-run summary: the row's numbers, where the results went, what to run next
    summary = captured.out[captured.out.index("== ce-dynamics replay finished"):]
    line = next(s for s in summary.splitlines() if s.startswith(f"{tiny_hub.hub_id} step4 prose"))
    assert float(line.split()[3]) == pytest.approx(row["cross_entropy"], abs=5e-5)
    assert re.search(rf"^  results +{re.escape(str(out / 'results.jsonl'))}$", summary, re.M), summary
    assert f"ce-dynamics scaling {out / 'results.jsonl'}" in summary
    assert math.isfinite(row["cross_entropy"])


def test_impossible_hardware_is_refused_once_before_the_walk(tiny_hub: HubCache, tmp_path: Path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    with offline_hub(tiny_hub.root):
        code = train.main([*args(tiny_hub, out), "replay.revisions=[0,2,4]", "trainer.accelerator=gpu"])
    err = capsys.readouterr().err
    assert code == 2
    problems = [line for line in err.splitlines() if "cannot run on this machine" in line]
    assert len(problems) == 1, err
    assert "trainer.accelerator=gpu trainer.devices=1" in problems[0]
    assert "Traceback" not in err and "step0" not in err
    assert not (out / "results.jsonl").exists()
