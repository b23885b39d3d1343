"""Config composition: default <- experiment <- command line, struct mode, clear errors, exit code 2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ce_dynamics.config import ConfigError, available_experiments, load_config

# Pythia's GPT-NeoX shapes (EleutherAI/pythia-*/config.json) and learning rates (the Pythia paper, table 6)
PYTHIA = {
    "pythia14m": (128, 6, 4, 512, 1e-3),
    "pythia70m": (512, 6, 8, 2048, 1e-3),
    "pythia160m": (768, 12, 12, 3072, 6e-4),
    "pythia410m": (1024, 24, 16, 4096, 3e-4),
    "pythia1b": (2048, 16, 8, 8192, 3e-4),
}


def test_default_is_tiny_with_output_dir_from_experiment_and_mode():
    cfg = load_config([])
    assert cfg.experiment == "tiny" and cfg.mode == "train"
    assert cfg.output_dir == "outputs/tiny/train"
    assert load_config(["mode=replay", "experiment=pythia70m"]).output_dir == "outputs/pythia70m/replay"
    assert list(cfg.data.eval_sets) == ["code", "prose"]
    assert list(cfg.replay.revisions) == [0, 16, 128, 1000, 10000, 100000]
    assert list(cfg.replay.models) == [] and cfg.replay.checkpoints is None and cfg.replay.dtype == "float32"


@pytest.mark.parametrize("name", sorted(PYTHIA))
def test_pythia_experiments_have_pythia_shapes_and_optimiser(name):
    hidden, layers, heads, ffn, lr = PYTHIA[name]
    cfg = load_config([f"experiment={name}"])
    m = cfg.model
    assert (m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.intermediate_size) == (hidden, layers, heads, ffn)
    assert (m.vocab_size, m.max_position_embeddings, m.rotary_pct) == (50304, 2048, 0.25)
    assert m.use_parallel_residual is True and m.tie_word_embeddings is False
    assert m.hub_id == f"EleutherAI/pythia-{name.removeprefix('pythia')}" and m.pretrained is False
    assert cfg.optim.lr == lr and list(cfg.optim.betas) == [0.9, 0.95] and cfg.optim.weight_decay == 0.01
    assert cfg.optim.warmup_steps == 1430 and cfg.optim.min_lr_ratio == 0.1 and cfg.trainer.max_steps == 143000
    assert cfg.data.seq_len == 512 and cfg.data.eval_sequences == 1000


def test_command_line_overrides_win_and_keep_types():
    cfg = load_config(["experiment=pythia160m", "trainer.max_steps=7", "data.batch_size=3", "optim.betas=[0.8,0.9]"])
    assert cfg.trainer.max_steps == 7 and cfg.data.batch_size == 3 and list(cfg.optim.betas) == [0.8, 0.9]
    assert cfg.model.hidden_size == 768  # the experiment still applies


def test_new_eval_sets_can_be_added_to_the_catalog():
    cfg = load_config(["data.eval.mine.source=file", "data.eval.mine.path=x.jsonl", "data.eval_sets=[mine,prose]"])
    assert list(cfg.data.eval_sets) == ["mine", "prose"] and cfg.data.eval.mine.path == "x.jsonl"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["experiment=nope"], "unknown experiment 'nope'; available: paper_fig3, paper_fig4, .*pythia14m, pythia160m"),
        (["trainer.max_stepz=3"], "unknown or invalid key 'trainer.max_stepz'.*trainer.max_steps"),
        (["modl.hidden_size=3"], "unknown or invalid key 'modl'.*model\\.\\*, data\\.\\*"),
        (["optim"], "must be key=value"),
        (["data.eval_sets=[wiki]"], "unknown \\['wiki'\\], available: code, prose, wikipedia"),
        (["logger.wandb.mode=maybe"], "offline, online or disabled"),
        (["data.seq_len=1"], "data.seq_len must be"),
        (["mode=serve"], "mode must be 'train', 'replay', 'sweep' or 'prepare'"),
        (["checkpoint.keep=best"], "checkpoint.keep must be 'last' or 'all'"),
        (["mode=sweep"], r"mode=sweep needs sweep.sizes"),
    ],
)
def test_bad_input_names_what_exists(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv)


def test_train_py_exits_2_on_config_errors(capsys):
    spec = importlib.util.spec_from_file_location("train_script", Path(__file__).resolve().parent.parent / "train.py")
    train_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_script)
    main = train_script.main
    assert main(["experiment=nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'nope'" in err and all(name in err for name in available_experiments())
    assert main(["trainer.max_stepz=1"]) == 2
