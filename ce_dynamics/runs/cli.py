"""The `ce-dynamics` console command (installed by pip) and the body of `python train.py`.

    ce-dynamics train [key=value ...]      # = python train.py [key=value ...]
    ce-dynamics replay [key=value ...]     # = python train.py mode=replay ...
    ce-dynamics sweep [key=value ...]      # = python train.py mode=sweep ...
    ce-dynamics scaling RESULTS [--out DIR] ...
    ce-dynamics experiments                # the experiment names (configs shipped with the package)

Configs: `default.yaml` <- `experiment/<name>.yaml` <- the command line's `key=value`, read from
`ce_dynamics.runs.config.CONFIG_DIR` (the package's own copy after `pip install`, the repository's `configs/` in a
checkout).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

_MODES = ("train", "replay", "sweep")

USAGE = """usage: ce-dynamics {{train,replay,sweep}} [key=value ...]
       ce-dynamics scaling RESULTS.jsonl [--out DIR] [--step N] [--min-models K] [--no-figures] [--holdout K]
       ce-dynamics experiments

Train a language model and watch its cross-entropy decomposition (train), walk released checkpoints (replay),
train a family of sizes (sweep), fit the scaling laws of a results file (scaling).

  key=value     OmegaConf overrides of configs/default.yaml and configs/experiment/<name>.yaml, e.g.
                experiment=pythia160m trainer.max_steps=400 logger.wandb.mode=online
  -h, --help    this message; with a command (`ce-dynamics train --help`, `python train.py --help`) also every
                config key with its value, meaning and accepted values; `ce-dynamics scaling --help` for the
                scaling options

configs: {config_dir}
experiments: {experiments}
"""


HELP = ("-h", "--help")


def _usage(argv: Sequence[str] = (), keys: bool = False) -> str:
    """The usage text; with `keys`, every config key with its value, meaning and accepted values (for the
    experiment `argv` names). Without the [train] extra: the usage and which extra to install."""
    from ce_dynamics._extras import require

    try:
        require("omegaconf")
    except ImportError as err:  # the message names the extra and how to install it here
        return USAGE.format(config_dir="(in the package)", experiments="(listed once [train] is installed)") \
            + f"\ntrain, replay, sweep and experiments need the [train] extra: {err}"
    from ce_dynamics.runs.config import CONFIG_DIR, available_experiments, keys_help

    text = USAGE.format(config_dir=CONFIG_DIR, experiments=", ".join(available_experiments()))
    return text + "\n" + keys_help(list(argv)) if keys else text


def run_config(argv: Sequence[str], prog: str = "train.py") -> int:
    """Compose the config from `argv` (`key=value`), run its mode, print the end-of-run summary; the exit code
    (2 for config errors). `python train.py` and `ce-dynamics train|replay|sweep` both land here."""
    from ce_dynamics._extras import require

    if any(a in HELP for a in argv):
        print(_usage([a for a in argv if a not in HELP], keys=True))
        return 0
    require("omegaconf")
    from ce_dynamics.runs.config import ConfigError, first_process, load_config, preflight
    from ce_dynamics.runs.lock import run_lock
    from ce_dynamics.runs.quiet import quiet_third_party

    quiet_third_party()
    argv = list(argv)
    try:  # a config error (bad key or value, missing ckpt_path, unwritable output_dir, a fresh run into a
        # directory holding a run, a run already going on there) prints one line and returns 2, before torch or
        # lightning is imported
        cfg = load_config(argv)
        with run_lock(cfg.output_dir, first_process() and cfg.mode != "prepare") as lock:
            preflight(cfg, argv, prog)
            code = _dispatch(cfg, argv, started=lock.mark_holder)
    except ConfigError as err:
        print(f"{prog}: config error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # a file of the run it cannot read (DamagedFileError): which one, and what to do
        files = sys.modules.get("ce_dynamics.files")  # not imported yet: no DamagedFileError (and no torch)
        if files is None or not isinstance(err, files.DamagedFileError):
            raise
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    if cfg.mode == "replay" and cfg.replay.dry_run:  # the plan is the whole output
        return code
    from ce_dynamics.runs.summary import print_summary

    print_summary(cfg, argv, exit_code=code, prog=prog)
    return code


def _dispatch(cfg: Any, argv: list[str], started: Callable[[], None] = lambda: None) -> int:
    """Run the mode `cfg.mode` names; `started()` once the last check before any work has passed (a run refused
    before that leaves nothing in output_dir)."""
    from ce_dynamics.runs.pinning import record_pins, run_prepare

    if cfg.mode == "prepare":
        return run_prepare(cfg)
    if cfg.mode == "replay" and (cfg.replay.dry_run or cfg.replay.shard == "merge"):  # reads no eval data
        from ce_dynamics.runs.replay import run_replay

        started()
        return run_replay(cfg, command_line=argv)
    if (code := record_pins(cfg)) is not None:  # a missing eval pin offline fails here, before any model loads
        return code
    started()
    if cfg.mode == "replay":
        from ce_dynamics.runs.replay import run_replay

        return run_replay(cfg, command_line=argv)
    if cfg.mode == "sweep":
        from ce_dynamics.runs.sweep import run_sweep

        return run_sweep(argv)
    from ce_dynamics.runs.training import run_training

    return run_training(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ce-dynamics` command (exit 1 with the extra to install when one is missing)."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except ImportError as err:
        if "ce-dynamics[" not in str(err):  # not one of ours: a real bug, show the traceback
            raise
        print(f"ce-dynamics: {err}", file=sys.stderr)
        return 1


def _main(args: list[str]) -> int:
    if not args or args[0] in (*HELP, "help"):
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "scaling":
        from ce_dynamics.analysis.report import main as scaling_main

        return scaling_main(rest)
    if command == "experiments":
        from ce_dynamics._extras import require

        require("omegaconf")
        from ce_dynamics.runs.config import available_experiments

        print("\n".join(available_experiments()))
        return 0
    if command not in _MODES:
        print(f"ce-dynamics: unknown command {command!r}; expected one of train, replay, sweep, scaling, "
              f"experiments (ce-dynamics --help)", file=sys.stderr)
        return 2
    if any(a in HELP for a in rest):
        print(_usage([a for a in rest if a not in HELP and not a.startswith("mode=")], keys=True))
        return 0
    given = [a for a in rest if a.startswith("mode=")]
    if given and given[-1] != f"mode={command}":
        print(f"ce-dynamics {command}: {given[-1]} contradicts the command; drop it", file=sys.stderr)
        return 2
    return run_config([f"mode={command}", *[a for a in rest if not a.startswith("mode=")]], prog=f"ce-dynamics {command}")


if __name__ == "__main__":
    sys.exit(main())
