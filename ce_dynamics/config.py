"""OmegaConf composition for train.py: `configs/default.yaml`, then `configs/experiment/<name>.yaml`, then
the command line's `key=value` dotlist, in struct mode so a misspelt key fails instead of being ignored."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A bad experiment name, key or value; the message says what exists. train.py exits 2 on it."""


def available_experiments(config_dir: Path = CONFIG_DIR) -> list[str]:
    """Names of `configs/experiment/*.yaml`, sorted."""
    return sorted(p.stem for p in (config_dir / "experiment").glob("*.yaml"))


def _valid_keys(cfg: DictConfig, prefix: str = "", recurse: bool = True) -> list[str]:
    keys = []
    for key, value in cfg.items_ex(resolve=False):
        name = f"{prefix}{key}"
        if isinstance(value, DictConfig):
            keys.extend(_valid_keys(value, f"{name}.") if recurse else [f"{name}.*"])
        else:
            keys.append(name)
    return keys


def _parse_dotlist(argv: list[str]) -> DictConfig:
    bad = [arg for arg in argv if "=" not in arg or arg.startswith("=")]
    if bad:
        raise ConfigError(f"arguments must be key=value (OmegaConf dotlist), got {bad}; e.g. trainer.max_steps=200")
    try:
        return OmegaConf.from_dotlist(argv)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse command line {argv}: {err}") from err


def _merge(base: DictConfig, override: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, override)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        parent = OmegaConf.select(base, key.rpartition(".")[0]) if "." in key else None
        section = parent if isinstance(parent, DictConfig) else base
        prefix = f"{key.rpartition('.')[0]}." if section is parent else ""
        valid = ", ".join(_valid_keys(section, prefix, recurse=section is parent))
        reason = str(err.msg).splitlines()[0]
        raise ConfigError(f"{source}: unknown or invalid key '{key}' ({reason}). Valid keys: {valid}") from err


def load_config(argv: list[str], config_dir: Path = CONFIG_DIR) -> DictConfig:
    """Compose default.yaml <- experiment <- `argv` dotlist; raise ConfigError listing what exists.

    `data.eval` is a catalog of user-named eval sets, so new names may be added there
    (`data.eval.mine.source=file data.eval.mine.path=a.txt data.eval_sets=[mine]`); everything else is strict.
    """
    cli = _parse_dotlist(list(argv))
    base = OmegaConf.load(config_dir / "default.yaml")
    name = cli.get("experiment", base.experiment)
    experiments = available_experiments(config_dir)
    if name not in experiments:
        raise ConfigError(f"unknown experiment '{name}'; available: {', '.join(experiments)}")
    OmegaConf.set_struct(base, True)
    OmegaConf.set_struct(base.data.eval, False)
    cfg = _merge(base, OmegaConf.load(config_dir / "experiment" / f"{name}.yaml"), f"experiment '{name}'")
    cfg = _merge(cfg, cli, "command line")
    cfg.experiment = name
    _check(cfg)
    if cfg.output_dir is None:
        cfg.output_dir = f"outputs/{cfg.experiment}/{cfg.mode}"
    return cfg


def _check(cfg: DictConfig) -> None:
    if cfg.mode not in ("train", "replay", "sweep", "prepare"):
        raise ConfigError(f"mode must be 'train', 'replay', 'sweep' or 'prepare', got '{cfg.mode}'")
    if cfg.mode == "sweep" and not cfg.sweep.sizes:
        raise ConfigError("mode=sweep needs sweep.sizes=[[hidden_size,num_hidden_layers],...] (e.g. experiment=tiny_scaling)")
    if cfg.checkpoint.keep not in ("last", "all"):
        raise ConfigError(f"checkpoint.keep must be 'last' or 'all', got '{cfg.checkpoint.keep}'")
    if cfg.logger.wandb.mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"logger.wandb.mode must be offline, online or disabled, got '{cfg.logger.wandb.mode}'")
    if cfg.replay.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"replay.dtype must be float32 or bfloat16, got '{cfg.replay.dtype}'")
    unknown = [n for n in cfg.data.eval_sets if n not in cfg.data.eval]
    if unknown or not cfg.data.eval_sets:
        raise ConfigError(
            f"data.eval_sets must name entries of data.eval; unknown {unknown}, available: {', '.join(cfg.data.eval)}"
        )
    for key in ("seq_len", "eval_sequences", "batch_size"):
        value = cfg.data[key]
        if not isinstance(value, int) or value < (2 if key == "seq_len" else 1):
            raise ConfigError(f"data.{key} must be a positive integer (seq_len >= 2), got {value!r}")
