"""Config composition: default <- experiment <- command line, struct mode, clear errors, exit code 2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ce_dynamics.runs.config import ConfigError, available_experiments, load_config

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
        (["trainer.max_stepz=3"], "unknown key 'trainer.max_stepz': not an argument of lightning.Trainer.*max_steps"),
        (["modl.hidden_size=3"], "unknown or invalid key 'modl'.*model\\.\\*, data\\.\\*"),
        (["optim"], "must be key=value"),
        (["data.eval_sets=[wiki]"], "unknown \\['wiki'\\], available: code, prose, wikipedia"),
        (["logger.wandb.mode=maybe"], "logger.wandb.mode='maybe': expected one of offline, online, disabled"),
        (["data.seq_len=1"], "data.seq_len=1: expected an integer >= 2"),
        (["mode=serve"], "mode='serve': expected one of train, replay, sweep"),
        (["checkpoint.keep=best"], "checkpoint.keep='best': expected one of last, all"),
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


# --- types and values checked at load (issue 9, item 4) ---

ROOT = Path(__file__).resolve().parent.parent


def test_every_key_of_default_yaml_has_a_rule():
    from omegaconf import OmegaConf

    from ce_dynamics.runs.config_schema import RULES, flat_items, trainer_arguments

    keys = [k for k, _ in flat_items(OmegaConf.load(ROOT / "configs" / "default.yaml")) if k != "data.eval"]
    missing = [k for k in keys if k not in RULES and k.removeprefix("trainer.") not in trainer_arguments()]
    assert not missing, f"add a rule for {missing} to ce_dynamics/runs/config_schema.RULES"
    assert len(keys) > 50


def test_sources_are_the_data_modules():
    from ce_dynamics.runs import data
    from ce_dynamics.runs.config_schema import SOURCES

    assert SOURCES == data.SOURCES


def test_trainer_arguments_are_lightning_trainers_signature():
    """Read with ast from the source; checked here against the imported class (an independent source)."""
    import inspect

    import lightning

    from ce_dynamics.runs.config_schema import trainer_arguments

    expected = [p for p in inspect.signature(lightning.Trainer.__init__).parameters if p != "self"]
    assert list(trainer_arguments()) == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["trainer.max_steps=abc"], "trainer.max_steps='abc': expected an integer >= -1"),
        (["trainer.max_steps=2.5"], "trainer.max_steps=2.5: expected an integer"),
        (["optim.lr=fast"], "optim.lr='fast': expected a number > 0"),
        (["optim.lr=0"], "optim.lr=0: expected a number > 0"),
        (["trainer.val_check_interval=0"], "trainer.val_check_interval=0: expected an integer >= 1, or a number"),
        (["trainer.val_check_interval=1.5"], "trainer.val_check_interval=1.5: expected"),
        (["trainer.devices=0"], "trainer.devices=0: expected an integer >= 1"),
        (["trainer.precision=bf17"], "trainer.precision='bf17': expected one of .*bf16-mixed"),
        (["trainer.limit_val_batches=many"], "trainer.limit_val_batches='many': expected"),
        (["trainer.max_epochs=x"], "trainer.max_epochs='x': expected an integer"),
        (["trainer.detect_anomaly=3"], "trainer.detect_anomaly=3: expected true or false"),  # from the signature
        (["trainer.logger=false"], "trainer.logger cannot be set: set the loggers with logger.wandb"),
        (["optim.betas=[0.9]"], r"optim.betas=\[0.9\]: expected a list of 2"),
        (["data.batch_size=0"], "data.batch_size=0: expected an integer >= 1"),
        (["data.train.source=web"], "data.train.source='web': expected one of stdlib, pydoc_topics, file, hf"),
        (["data.eval.mine.source=web", "data.eval_sets=[mine]"], "data.eval.mine.source='web': expected one of"),
        (["data.eval.mine.source=file", "data.eval_sets=[mine]"], "data.eval.mine.path=null: expected a file path"),
        (["sweep.sizes=[[32,2],[48]]"], r"sweep.sizes=\[\[32, 2\], \[48\]\]: expected a list of \[a list of 2"),
        (["replay.revisions=[0,last]"], r"replay.revisions=\[0, 'last'\]: expected a list of"),
        (["overwrite=maybe"], "overwrite='maybe': expected true or false"),
        (["num_threads=0"], "num_threads=0: expected an integer >= 1, or null"),
        (["model.hidden_size=30"], "model.hidden_size=30 must be a multiple of model.num_attention_heads=4"),
        (["output_dir=${nope}"], "output_dir: cannot resolve"),
        (["overwrite=true", "ckpt_path=last"], "overwrite=true starts afresh but ckpt_path=last resumes"),
    ],
)
def test_wrong_types_and_values_name_the_key_the_value_and_what_is_expected(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["trainer.val_check_interval=0.25"], ["trainer.val_check_interval=00:00:10:00"], ["trainer.devices=[0,1]"],
        ["trainer.devices='0,1'"], ["trainer.devices=-1"], ["trainer.precision=bf16-mixed"], ["trainer.precision=16"],
        ["trainer.max_steps=-1"], ["optim.lr=1"], ["trainer.max_time=00:12:00:00"], ["trainer.profiler=simple"],
        ["replay.revisions=[step1000,2]"], ["trainer.deterministic=warn"],
    ],
)
def test_values_lightning_accepts_are_accepted(argv):
    load_config(argv)


def test_any_trainer_argument_reaches_lightning_trainer(tmp_path):
    from ce_dynamics.runs.training import build_trainer

    cfg = load_config([f"output_dir={tmp_path}", "trainer.limit_val_batches=4", "trainer.max_epochs=3",
                       "trainer.enable_checkpointing=false", "trainer.accelerator=cpu"])
    trainer = build_trainer(cfg, callbacks=[], loggers=[])
    assert (trainer.limit_val_batches, trainer.max_epochs, trainer.checkpoint_callback) == (4, 3, None)


_CHECK_IN_A_FRESH_PROCESS = """
import json, sys
sys.path.insert(0, sys.argv[1])
import train
out = []
for argv in json.loads(sys.argv[2]):
    code = train.main(argv)
    out.append([code, sorted(m for m in ("torch", "lightning", "transformers", "wandb") if m in sys.modules)])
print(json.dumps(out))
"""


def test_config_errors_exit_2_before_torch_or_lightning_is_imported(tmp_path):
    """Every refusal happens in a process that never imported torch, lightning, transformers or wandb."""
    import json
    import subprocess
    import sys

    read_only_parent = tmp_path / "a_file"
    read_only_parent.write_text("")
    cases = [["trainer.max_steps=abc"], ["optim.lr=fast"], ["trainer.val_check_interval=0"], ["trainer.max_stepz=1"],
             ["ckpt_path=nowhere/last.ckpt"], [f"output_dir={read_only_parent}/run"], ["trainer.limit_val_batches=x"]]
    proc = subprocess.run([sys.executable, "-c", _CHECK_IN_A_FRESH_PROCESS, str(ROOT), json.dumps(cases)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [code for code, _ in results] == [2] * len(cases), proc.stderr
    assert all(heavy == [] for _, heavy in results), results
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == len(cases) and "Traceback" not in proc.stderr
    for line, key in zip(lines, ["trainer.max_steps", "optim.lr", "trainer.val_check_interval", "trainer.max_stepz",
                                 "ckpt_path", "output_dir", "trainer.limit_val_batches"]):
        assert line.startswith(f"train.py: config error: ") and key in line, line


def test_train_py_on_the_command_line_prints_one_line_and_exits_2(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "trainer.max_steps=abc"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("train.py: config error: trainer.max_steps='abc': expected an integer >= -1 "
                           "(-1: no limit)\n")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("interval", ["2", "10", "0.5", "'00:00:01:00'"])
def test_validations_inside_a_gradient_accumulation_are_refused_naming_both_keys(interval, capsys):
    spec = importlib.util.spec_from_file_location("train_script", Path(__file__).resolve().parent.parent / "train.py")
    train_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_script)
    argv = ["trainer.accumulate_grad_batches=4", f"trainer.val_check_interval={interval}"]
    assert train_script.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trainer.val_check_interval=" in err
    assert "trainer.accumulate_grad_batches=4" in err and "expected a multiple of 4 batches" in err


@pytest.mark.parametrize("interval", [4, 8, 1.0, None])
def test_validations_on_whole_optimizer_steps_are_accepted(interval):
    value = "null" if interval is None else interval
    cfg = load_config(["trainer.accumulate_grad_batches=4", f"trainer.val_check_interval={value}"])
    assert cfg.trainer.val_check_interval == interval
