"""OmegaConf composition for train.py: `configs/default.yaml`, then `configs/experiment/<name>.yaml`, then
the command line's `key=value` dotlist, in struct mode so a misspelt key fails instead of being ignored; every
value is then checked against `config_schema.RULES` (types, ranges, `trainer.*` against lightning.Trainer).
`preflight(cfg)` checks the filesystem side (ckpt_path, output_dir, reruns) before any work starts."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ce_dynamics._extras import require

require("omegaconf")

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ce_dynamics.runs.commands import rerun
from ce_dynamics.runs.config_schema import ConfigError, check_types, flat_items
from ce_dynamics.runs.shards import MERGE, parse_shard, shard_dir

__all__ = ["CONFIG_DIR", "RESUME_VALUES", "RUN_ENTRIES", "ConfigError", "available_experiments", "first_process",
           "load_config",
           "preflight"]


def _config_dir() -> Path:
    """`ce_dynamics/configs` of an installed package (pyproject maps the repo's configs/ there), else the
    source checkout's top-level `configs/` (a checkout or an editable install)."""
    package = Path(__file__).resolve().parent.parent
    installed = package / "configs"
    return installed if (installed / "default.yaml").is_file() else package.parent / "configs"


CONFIG_DIR = _config_dir()


# What a training run writes under output_dir: a fresh run refuses a directory holding any of them.
RUN_ENTRIES = ("checkpoints", "arrays", "csv", "wandb", "wandb_run_ids.json")


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
    (`data.eval.mine.source=file data.eval.mine.path=a.txt data.eval_sets=[mine]`), and `trainer.*` takes any
    argument of `lightning.Trainer`; everything else is strict. Reads no file but the configs, imports no torch.
    """
    cli = _parse_dotlist(list(argv))
    base = OmegaConf.load(config_dir / "default.yaml")
    name = cli.get("experiment", base.experiment)
    experiments = available_experiments(config_dir)
    if name not in experiments:
        raise ConfigError(f"unknown experiment '{name}'; available: {', '.join(experiments)}")
    OmegaConf.set_struct(base, True)
    OmegaConf.set_struct(base.data.eval, False)
    OmegaConf.set_struct(base.trainer, False)  # any Trainer argument; checked against its signature below
    defaults = dict(flat_items(base))
    cfg = _merge(base, OmegaConf.load(config_dir / "experiment" / f"{name}.yaml"), f"experiment '{name}'")
    cfg = _merge(cfg, cli, "command line")
    cfg.experiment = name
    check_types(cfg, defaults)
    _check(cfg)
    if cfg.output_dir is None:
        cfg.output_dir = f"outputs/{cfg.experiment}/{cfg.mode}"
    if cfg.mode == "replay" and cfg.replay.shard not in (None, MERGE):  # one folder (and lock) per shard
        cfg.output_dir = str(shard_dir(cfg.output_dir, parse_shard(cfg.replay.shard)))
    return cfg


def _check(cfg: DictConfig) -> None:
    """Checks that involve several keys (each key's own type and range is config_schema's)."""
    if cfg.mode == "sweep" and not cfg.sweep.sizes:
        raise ConfigError("mode=sweep needs sweep.sizes=[[hidden_size,num_hidden_layers],...] (e.g. experiment=tiny_scaling)")
    unknown = [n for n in cfg.data.eval_sets if n not in cfg.data.eval]
    if unknown or not cfg.data.eval_sets:
        raise ConfigError(
            f"data.eval_sets must name entries of data.eval; unknown {unknown}, available: {', '.join(cfg.data.eval)}"
        )
    repeated = sorted({n for n in cfg.data.eval_sets if list(cfg.data.eval_sets).count(n) > 1})
    if repeated:
        raise ConfigError(f"data.eval_sets={list(cfg.data.eval_sets)}: {', '.join(repeated)} named twice; expected "
                          f"each eval set once (one validation dataloader and one record per name)")
    train = cfg.data.train
    if train.source in ("file", "hf") and not train.path:
        what = "a text or .jsonl file" if train.source == "file" else "a Hugging Face dataset id"
        raise ConfigError(f"data.train.path=null: expected {what} for data.train.source={train.source}")
    m = cfg.model
    if m.pretrained and not m.hub_id:
        raise ConfigError("model.pretrained=true needs model.hub_id (the Hugging Face id to load)")
    if not m.pretrained and m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} must be a multiple of "
                          f"model.num_attention_heads={m.num_attention_heads}")
    _check_one_validation_per_step(cfg.trainer)
    if cfg.overwrite and cfg.ckpt_path is not None:
        raise ConfigError(f"overwrite=true starts afresh but ckpt_path={cfg.ckpt_path} resumes: give one of them")


RESUME_VALUES = ("last", "last_or_new")


def _check_one_validation_per_step(trainer: DictConfig) -> None:
    """Every validation at its own optimizer step: with gradient accumulation, `val_check_interval` (which counts
    training batches) must be a whole number of optimizer steps, or two validations could share a `global_step`
    (which every sink records once) and a checkpoint could be taken half-way through an accumulation."""
    accumulate = trainer.get("accumulate_grad_batches", 1)
    interval = trainer.get("val_check_interval")
    if accumulate == 1 or interval is None or (isinstance(interval, float) and interval == 1.0):
        return  # null / 1.0: at an epoch's end, where Lightning always steps the optimizer
    if isinstance(interval, int) and not isinstance(interval, bool) and interval % accumulate == 0:
        return
    example = max(accumulate, interval // accumulate * accumulate) if isinstance(interval, int) else accumulate
    raise ConfigError(
        f"trainer.val_check_interval={interval} with trainer.accumulate_grad_batches={accumulate}: validations would "
        f"fall inside an accumulation (two can share one global_step, and a checkpoint there loses the accumulated "
        f"gradients); expected a multiple of {accumulate} batches (e.g. trainer.val_check_interval={example}), 1.0 "
        f"or null (once per epoch)")


def preflight(cfg: DictConfig, argv: list[str] | None = None, prog: str = "train.py") -> None:
    """Refuse, before any work, what would fail or damage a run later; with `overwrite=true`, clear the old run.

    * `ckpt_path` must be null, `last`, `last_or_new` or an existing path; `last` also needs a run in
      `output_dir` to resume (a misspelt output_dir must not silently become a new run); `last_or_new` resumes
      one if there is one, else starts afresh (what sweep members use);
    * `output_dir` must be a directory this process can write (or creatable in one);
    * a fresh `mode=train` run (ckpt_path null) refuses an output_dir that holds a run (any of RUN_ENTRIES),
      naming the ways on, unless `overwrite=true`, which deletes those entries (nothing else) first.
      Replay and sweep reruns resume by design and are never refused; nor is a non-zero rank of a launch.
    `argv` and `prog` (the command line as given) phrase the commands a refusal suggests.
    Raises ConfigError; changes nothing on refusal.
    """
    if cfg.ckpt_path not in (None, *RESUME_VALUES) and not Path(cfg.ckpt_path).exists():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no such file; expected null, 'last' "
                          f"(output_dir/checkpoints/last.ckpt), 'last_or_new' or the path of a checkpoint")
    out = Path(cfg.output_dir)
    _check_writable(out)
    _check_writable(Path(cfg.data.cache_dir).expanduser(), "data.cache_dir")
    files = {"data.train.path": cfg.data.train.path} if cfg.data.train.source == "file" else {}
    files.update({f"data.eval.{name}.path": cfg.data.eval[name].get("path") for name in cfg.data.eval_sets
                  if cfg.data.eval[name].get("source") == "file"})
    for key, path in files.items():
        if not Path(path).expanduser().is_file():
            raise ConfigError(f"{key}={path}: no such file; expected a text file or a .jsonl (a document per line)")
    if cfg.mode == "train" and cfg.ckpt_path is not None:
        _check_resumable(cfg, out)
    if cfg.mode != "train" or not first_process():
        return  # a DDP child re-runs train.py after rank zero began writing: rank zero alone decides
    existing = [name for name in RUN_ENTRIES if os.path.lexists(out / name)]
    args = [a for a in (argv or []) if not a.startswith(("ckpt_path=", "overwrite="))]
    if cfg.ckpt_path == "last" and not existing:
        raise ConfigError(
            f"ckpt_path=last: output_dir {out} holds no run to resume (no checkpoints/, arrays/, csv/ or wandb/); "
            f"check output_dir, start a new run without ckpt_path ({rerun(args, prog)}), or pass "
            f"ckpt_path=last_or_new to resume if there is a run and start afresh if not"
        )
    if cfg.ckpt_path is not None or not existing:
        return
    if not cfg.overwrite:
        raise ConfigError(
            f"output_dir {out} already holds a run ({', '.join(existing)}); resume it with "
            f"{rerun([*args, 'ckpt_path=last'], prog)}, start afresh with "
            f"{rerun([*args, 'overwrite=true'], prog)} (deletes the old run), or start a new run "
            f"with output_dir=<another directory>"
        )
    for name in existing:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _check_resumable(cfg: DictConfig, out: Path) -> None:
    """A resume refuses a checkpoint or CSV log it cannot read (DamagedFileError naming the file and what to do),
    instead of failing seconds later with a bare EOFError or UnicodeDecodeError."""
    import zipfile

    from ce_dynamics.files import DamagedFileError, read_text

    ckpt = out / "checkpoints" / "last.ckpt" if cfg.ckpt_path in RESUME_VALUES else Path(cfg.ckpt_path)
    if ckpt.is_file():
        try:  # torch.save writes a zip archive whose directory comes last: a cut or emptied file has none
            zipfile.ZipFile(ckpt).close()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise DamagedFileError(ckpt, f"not a readable checkpoint: {type(err).__name__}: {err}",
                                   "resume from another checkpoint (ckpt_path=<file>; checkpoint.keep=all keeps one "
                                   "per validation), or move it aside and start afresh with overwrite=true") from None
    from ce_dynamics.lightning.csv_logger import CSV_REMEDY

    csv_log = out / "csv" / "version_0" / "metrics.csv"
    if csv_log.is_file():
        read_text(csv_log, CSV_REMEDY)


def first_process() -> bool:
    """False in a process a launcher started as a non-zero rank (Lightning's DDP children, torchrun, SLURM)."""
    return all(os.environ.get(var, "0") == "0" for var in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))


def _check_writable(out: Path, key: str = "output_dir") -> None:
    """Refuse a directory (`key`'s value) that cannot be created or written, by trying (permission bits lie to
    root)."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{key}={out}: {probe} is not a directory; expected a directory path")
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as err:
        raise ConfigError(f"{key}={out} is not writable ({err.strerror} in {probe}); expected a directory "
                          f"this user can write, e.g. {key}=/tmp/run") from None



def _default_comments(config_dir: Path) -> dict[str, str]:
    """`{dotted key: its comment in default.yaml}`, a comment continued on the lines below it included (the
    data.eval catalog's entries are examples, not keys, and are left out)."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing sections
    last: tuple[int, str] | None = None  # (column of the comment, key) of the last key line with a comment
    for line in (config_dir / "default.yaml").read_text(encoding="utf-8").splitlines():
        body, _, comment = line.partition("#")
        indent = len(line) - len(line.lstrip())
        if not body.strip():
            if comment and last and line.index("#") == last[0]:  # a comment continued on its own line
                comments[last[1]] += " " + comment.strip()
            continue
        key = body.strip().split(":", 1)[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key])
        stack.append((indent, key))
        last = (line.index("#"), dotted) if comment else None
        if comment and not dotted.startswith("data.eval."):
            comments[dotted] = comment.strip()
    return comments


def keys_help(argv: list[str], config_dir: Path = CONFIG_DIR) -> str:
    """Every config key with its value (default.yaml <- the experiment <- `argv`), what it means (the comment in
    default.yaml) and what it accepts (its rule in config_schema.RULES): what `train.py --help` prints."""
    from ce_dynamics.runs.config_schema import RULES

    try:
        cfg = load_config([a for a in argv if not a.startswith(("-h", "--help"))], config_dir)
    except ConfigError:
        cfg = load_config([], config_dir)
    comments = _default_comments(config_dir)
    items = [(k, v) for k, v in flat_items(cfg) if k != "data.eval"]
    width = max(len(f"{k}={_typed(v)}") for k, v in items)
    lines = [f"keys (experiment={cfg.experiment}: configs/default.yaml <- experiment/{cfg.experiment}.yaml; "
             f"set any with key=value):"]
    for key, value in items:
        meaning = comments.get(key, "")
        rule = RULES.get(key)
        accepts = f"[{rule.expected}]" if rule is not None else ""
        lines.append(f"  {f'{key}={_typed(value)}'.ljust(width)}  {'  '.join(x for x in (meaning, accepts) if x)}".rstrip())
    lines.append(f"  {'data.eval.<name>.source=...'.ljust(width)}  {comments.get('data.eval', '')} "
                 f"(sets: {', '.join(cfg.data.eval)}; fields source, path, name, split, field)")
    lines.append(f"  {'trainer.<argument>=...'.ljust(width)}  any other argument of lightning.Trainer")
    return "\n".join(lines)


def _typed(value: object) -> str:
    """A value as it is typed on the command line."""
    if isinstance(value, list):
        return "[" + ",".join(map(_typed, value)) + "]"
    return {None: "null", True: "true", False: "false"}.get(value, str(value)) if not isinstance(value, (int, float)) \
        or isinstance(value, bool) else str(value)
