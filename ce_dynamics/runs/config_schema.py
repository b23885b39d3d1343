"""The type and allowed values of every config key, checked when the config is loaded.

Checked before torch or lightning is imported, so a typo costs a second, not a model build. `RULES` holds one
line per key of `configs/default.yaml`; to add a key, add it to default.yaml with its default and give it a rule
here (a key without a rule is checked against the type of its default). `trainer.*` takes every argument of
`lightning.Trainer.__init__`, read from Lightning's source with `ast` (importing lightning costs seconds).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ce_dynamics.runs.shards import is_shard_value

MODES = ("train", "replay", "sweep", "prepare")
WEIGHTS = ("whole", "device_map")  # replay.weights: each process loads the model whole, or its layers spread
SOURCES = ("stdlib", "pydoc_topics", "file", "hf")  # == ce_dynamics.runs.data.SOURCES (tests keep them equal)
# Trainer arguments train.py passes itself; a config value for them would clash.
TRAINER_SET_BY_TRAIN_PY = {
    "callbacks": "train.py adds its own callbacks",
    "logger": "set the loggers with logger.wandb.*",
    "default_root_dir": "set output_dir instead",
    "plugins": "train.py sets its own checkpoint IO (atomic writes)",
}


class ConfigError(ValueError):
    """A bad experiment name, key or value, or an output_dir that cannot take the run; the message says what
    was wrong and what is expected. train.py prints it on one line and exits 2."""


@dataclass(frozen=True)
class Rule:
    """A predicate on a (plain Python) value and the words for what it accepts."""

    ok: Callable[[Any], bool]
    expected: str

    def __or__(self, other: Rule) -> Rule:
        return Rule(lambda v: self.ok(v) or other.ok(v), f"{self.expected}, or {other.expected}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bounds(low: float | None, high: float | None, low_open: bool = False,
            high_open: bool = False) -> tuple[Callable[[Any], bool], str]:
    words = []
    if low is not None:
        words.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        words.append(f"{'<' if high_open else '<='} {high}")

    def inside(v: Any) -> bool:
        return ((low is None or (v > low if low_open else v >= low))
                and (high is None or (v < high if high_open else v <= high)))

    return inside, (" " + " and ".join(words)) if words else ""


def integer(low: int | None = None, high: int | None = None) -> Rule:
    inside, words = _bounds(low, high)
    return Rule(lambda v: _is_int(v) and inside(v), f"an integer{words}")


def number(low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Rule:
    inside, words = _bounds(low, high, low_open, high_open)
    return Rule(lambda v: _is_number(v) and inside(v), f"a number{words}")


def one_of(*values: Any) -> Rule:
    shown = ", ".join(dict.fromkeys(map(str, values)))  # 64 and "64" read the same on a command line
    return Rule(lambda v: any(v == x and type(v) is type(x) for x in values), f"one of {shown}")


def list_of(item: Rule, length: int | None = None) -> Rule:
    sized = f"{length} " if length is not None else ""
    return Rule(lambda v: isinstance(v, list) and (length is None or len(v) == length) and all(map(item.ok, v)),
                f"a list of {sized}[{item.expected}]")


BOOL = Rule(lambda v: isinstance(v, bool), "true or false")
STR = Rule(lambda v: isinstance(v, str) and v != "", "a non-empty string")
NULL = Rule(lambda v: v is None, "null")
MAPPING = Rule(lambda v: isinstance(v, dict), "a mapping")
ANY = Rule(lambda v: True, "anything")
POSITIVE = integer(1)
TIME = Rule(lambda v: isinstance(v, str) and re.fullmatch(r"\d+:\d\d:\d\d:\d\d", v) is not None,
            "a duration 'DD:HH:MM:SS'")

# Names Lightning's Trainer takes for `accelerator=` / `strategy=` besides those in its registries.
_LIGHTNING_ALIASES = {"accelerators": ("auto", "gpu"), "strategies": ("auto",)}
_SINGULAR = {"accelerators": "accelerator", "strategies": "strategy"}


@functools.lru_cache(maxsize=2)
def lightning_registry(kind: str) -> frozenset[str]:
    """Every name `lightning.Trainer` takes for `accelerator=` (kind "accelerators") or `strategy=`
    ("strategies"): the names Lightning's `register_<kind>` class methods put in its registry, read from its
    source with `ast` (importing lightning costs seconds), plus the connector's own aliases."""
    root = _lightning_dir()
    folder = root / "pytorch" / kind if root else None
    if folder is None or not folder.is_dir():
        raise ConfigError(f"cannot find lightning's {kind} (pip install lightning) to check trainer.* keys")
    names = set(_LIGHTNING_ALIASES[kind])
    for path in [*folder.glob("*.py"), *(root / "pytorch" / "_graveyard").glob("*.py")]:  # deprecated aliases too
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                constants = {t.id: a.value.value for a in node.body if isinstance(a, ast.Assign)
                             for t in a.targets if isinstance(t, ast.Name) and isinstance(a.value, ast.Constant)}
                constants.update({f.name: f.body[-1].value.value for f in node.body  # def name(cls): return "cpu"
                                  if isinstance(f, ast.FunctionDef) and isinstance(f.body[-1], ast.Return)
                                  and isinstance(f.body[-1].value, ast.Constant)})
                for function in node.body:
                    if isinstance(function, ast.FunctionDef) and function.name == f"register_{kind}":
                        names.update(_registered_names(function, constants))
            elif isinstance(node, ast.FunctionDef) and path.parent.name == "_graveyard":
                names.update(_registered_names(node, {}, receiver=_SINGULAR[kind]))
    return frozenset(names)


def _registered_names(function: ast.FunctionDef, constants: Mapping[str, Any], receiver: str = "") -> set[str]:
    """The string names a `register_<kind>` method registers: `registry.register("name", ...)` or
    `registry.register(cls.<constant of the class or method returning one>, ...)`, or the first field of each entry of a tuple of tuples
    looped over (`for name, ... in entries: registry.register(name, ...)`). With `receiver`, only calls on a
    registry whose name holds it (`strategy_registry.register`), and no entries."""
    names = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "register" \
                and node.args and receiver in ast.unparse(node.func.value):
            first = node.args[0].func if isinstance(node.args[0], ast.Call) else node.args[0]  # cls.name()
            value = first.value if isinstance(first, ast.Constant) else (
                constants.get(first.attr) if isinstance(first, ast.Attribute) else None)
            if isinstance(value, str):
                names.add(value)
        elif not receiver and isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
            for entry in node.value.elts:
                if (isinstance(entry, ast.Tuple) and entry.elts and isinstance(entry.elts[0], ast.Constant)
                        and isinstance(entry.elts[0].value, str)):
                    names.add(entry.elts[0].value)
    return names


def lightning_accepts(kind: str, value: Any) -> bool:
    """Whether `value` is a name Lightning's Trainer takes for `kind` (see :func:`lightning_registry`)."""
    return isinstance(value, str) and value in lightning_registry(kind)


# One rule per key of configs/default.yaml (data.eval.<name>.* is checked by `CATALOG_FIELDS`).
RULES: dict[str, Rule] = {
    "experiment": STR,
    "mode": one_of(*MODES),
    "output_dir": STR | NULL,
    "seed": integer(0, 2**32 - 1),
    "num_threads": POSITIVE | NULL,
    "ckpt_path": STR | NULL,
    "overwrite": BOOL,
    "model.hub_id": STR | NULL,
    "model.revision": STR | NULL,
    "model.pretrained": BOOL,
    "model.tokenizer": STR | NULL,
    "model.validation_output": one_of("logits", "hidden_states"),
    "model.vocab_size": POSITIVE,
    "model.hidden_size": POSITIVE,
    "model.num_hidden_layers": POSITIVE,
    "model.num_attention_heads": POSITIVE,
    "model.intermediate_size": POSITIVE,
    "model.max_position_embeddings": POSITIVE,
    "model.rotary_pct": number(0, 1, low_open=True),
    "model.rotary_emb_base": number(0, low_open=True),
    "model.use_parallel_residual": BOOL,
    "model.tie_word_embeddings": BOOL,
    "model.layer_norm_eps": number(0, low_open=True),
    "model.initializer_range": number(0, low_open=True),
    "data.seq_len": integer(2),
    "data.eval_sequences": POSITIVE,
    "data.batch_size": POSITIVE,
    "data.num_workers": integer(0),
    "data.cache_dir": STR,
    "data.tokenizer_train_chars": POSITIVE,
    "data.train.source": one_of(*SOURCES),
    "data.train.path": STR | NULL,
    "data.train.name": STR | NULL,
    "data.train.split": STR | NULL,
    "data.train.field": STR | NULL,
    "data.train.max_chars": POSITIVE | NULL,
    "data.eval_sets": list_of(STR),
    "optim.lr": number(0, low_open=True),
    "optim.min_lr_ratio": number(0, 1),
    "optim.warmup_steps": integer(0),
    "optim.weight_decay": number(0),
    "optim.betas": list_of(number(0, 1, high_open=True), length=2),  # torch.optim.AdamW: 0 <= beta < 1
    "optim.eps": number(0, low_open=True),
    "trainer.accelerator": Rule(lambda v: lightning_accepts("accelerators", v),
                                "one of Lightning's accelerators (auto, cpu, cuda, gpu, mps, tpu, ...)"),
    # Lightning's device parser: an int, -1 (all), a list of indices, or the same as a string ('1', '0,1', 'auto')
    "trainer.devices": POSITIVE | one_of(-1) | list_of(integer(0)) | Rule(
        lambda v: isinstance(v, str) and re.fullmatch(r"\s*(auto|-1|\d+|\d+(\s*,\s*\d+)*\s*,?)\s*", v) is not None,
        "a string of the same ('auto', '2', '0,1')"),
    "trainer.num_nodes": POSITIVE,
    "trainer.strategy": Rule(lambda v: lightning_accepts("strategies", v),
                             "one of Lightning's registered strategies (auto, ddp, ddp_spawn, fsdp, deepspeed, ...)"),
    "trainer.max_steps": Rule(integer(-1).ok, "an integer >= -1 (-1: no limit)"),
    "trainer.max_epochs": integer(-1) | NULL,
    "trainer.val_check_interval": POSITIVE | number(0, 1, low_open=True) | TIME | NULL,
    "trainer.check_val_every_n_epoch": POSITIVE | NULL,
    "trainer.log_every_n_steps": integer(0) | NULL,
    "trainer.gradient_clip_val": number(0) | NULL,
    "trainer.accumulate_grad_batches": POSITIVE,
    "trainer.num_sanity_val_steps": integer(-1) | NULL,
    "trainer.limit_val_batches": integer(0) | number(0, 1) | NULL,
    "trainer.limit_train_batches": integer(0) | number(0, 1) | NULL,
    "trainer.enable_progress_bar": BOOL | NULL,
    "trainer.enable_model_summary": BOOL | NULL,
    "eval.bootstrap": Rule(lambda v: _is_int(v) and (v == 0 or v >= 2), "0 (off) or an integer >= 2 (replicates)"),
    "checkpoint.keep": one_of("last", "all"),
    "logger.wandb.mode": one_of("offline", "online", "disabled"),
    "logger.wandb.project": STR,
    "sweep.sizes": list_of(list_of(POSITIVE, length=2)),
    "replay.models": list_of(STR),
    "replay.revisions": list_of(integer(0) | Rule(lambda v: isinstance(v, str) and re.fullmatch(r"step\d+", v)
                                                  is not None, "'stepN'") | one_of("main")) | one_of("all"),
    "replay.checkpoints": STR | NULL,
    "replay.dtype": one_of("float32", "bfloat16"),
    "replay.keep_weights": BOOL,
    "replay.shard": Rule(is_shard_value, "null, 'merge', or 'i/n' with 0 <= i < n (this job's slice of the walk)"),
    "replay.weights": one_of(*WEIGHTS),
    "replay.max_memory": MAPPING | NULL,
    "replay.offload_dir": STR | NULL,
    "replay.dry_run": BOOL,
}

# Fields of a data.eval catalog entry that ce_dynamics.runs.data reads; other fields pass unchecked (the catalog is open).
CATALOG_FIELDS: dict[str, Rule] = {
    "source": one_of(*SOURCES),
    "path": STR | NULL,
    "name": STR | NULL,
    "split": STR | NULL,
    "field": STR | NULL,
}


def _lightning_dir() -> Path | None:
    spec = importlib.util.find_spec("lightning")  # a top-level find_spec imports nothing
    return Path(spec.origin).parent if spec and spec.origin else None


def _literal_values(path: Path, names: set[str]) -> list[Any]:
    """The values of `NAME = Literal[...]` assignments in a source file, for NAME in `names`."""
    values: list[Any] = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id in names and isinstance(node.value, ast.Subscript)):
            inner = node.value.slice
            for elt in inner.elts if isinstance(inner, ast.Tuple) else [inner]:
                if isinstance(elt, ast.Constant):
                    values.append(elt.value)
    return values


def _annotation_rule(node: ast.expr | None) -> Rule | None:
    """A rule for what a YAML value may be under a type annotation; None for a class YAML cannot express."""
    simple = {"int": integer(), "float": number(), "bool": BOOL, "str": Rule(lambda v: isinstance(v, str), "a string")}
    if node is None:
        return ANY
    if isinstance(node, ast.Constant) and node.value is None:
        return NULL
    if isinstance(node, ast.Name):
        if node.id in simple:
            return simple[node.id]
        return ANY if node.id.startswith("_") else None  # a type alias (unknown here: anything), or a class
    if isinstance(node, ast.Subscript):
        head = node.value.id if isinstance(node.value, ast.Name) else getattr(node.value, "attr", "")
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if head in ("Optional", "Union"):
            rules = [_annotation_rule(a) for a in args] + ([NULL] if head == "Optional" else [])
            if any(r is ANY for r in rules):
                return ANY
            kept = [r for r in rules if r is not None]
            return functools.reduce(Rule.__or__, kept) if kept else None
        if head == "Literal":
            return one_of(*[a.value for a in args if isinstance(a, ast.Constant)])
        if head in ("list", "List", "Iterable", "Sequence"):
            return list_of(_annotation_rule(args[0]) or ANY)
        if head in ("dict", "Dict", "Mapping"):
            return MAPPING
    return ANY


@functools.lru_cache(maxsize=1)
def trainer_arguments() -> dict[str, Rule]:
    """`lightning.Trainer.__init__`'s keyword arguments with a rule from each annotation (read with `ast`)."""
    root = _lightning_dir()
    source = root / "pytorch" / "trainer" / "trainer.py" if root else None
    if source is None or not source.is_file():
        raise ConfigError("cannot find lightning's Trainer source (pip install lightning) to check trainer.* keys")
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ClassDef) and node.name == "Trainer":
            init = next(f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
            args = [*init.args.args[1:], *init.args.kwonlyargs]
            rules = {a.arg: _annotation_rule(a.annotation) or ANY for a in args}
            precision = _literal_values(root / "fabric" / "plugins" / "precision" / "precision.py",
                                        {"_PRECISION_INPUT_INT", "_PRECISION_INPUT_STR", "_PRECISION_INPUT_STR_ALIAS"})
            if precision:
                rules["precision"] = one_of(*precision) | NULL
            return rules
    raise ConfigError(f"no class Trainer in {source}; cannot check trainer.* keys")


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def flat_items(cfg: DictConfig, prefix: str = "") -> list[tuple[str, Any]]:
    """`(dotted key, plain value)` of every leaf, resolved; the data.eval catalog and keys whose rule takes a
    mapping (`replay.max_memory`) are one leaf each (a dict)."""
    out = []
    for key in cfg:
        name = f"{prefix}{key}"
        try:
            value = cfg[key]
        except OmegaConfBaseException as err:
            raise ConfigError(f"{name}: cannot resolve its value ({str(err).splitlines()[0]})") from None
        if isinstance(value, DictConfig) and name != "data.eval" and not (name in RULES and RULES[name].ok({})):
            out.extend(flat_items(value, f"{name}."))
        else:
            out.append((name, _plain(value)))
    return out


def _default_rule(default: Any) -> Rule:
    """The rule of a key that has none in RULES: the type of its default (null: anything)."""
    if isinstance(default, bool):
        return BOOL
    if _is_int(default):
        return integer()
    if isinstance(default, float):
        return number()
    if isinstance(default, str):
        return Rule(lambda v: isinstance(v, str), "a string")
    if isinstance(default, list):
        return Rule(lambda v: isinstance(v, list), "a list")
    return ANY


def _shown(value: Any) -> str:
    """The value as the user would type it back: strings quoted, null/true/false in YAML's words."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(_shown, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shown(v)}" for k, v in value.items()) + "}"
    return {None: "null", True: "true", False: "false"}.get(value, str(value)) if not _is_number(value) else str(value)


def _refuse(key: str, value: Any, expected: str) -> None:
    raise ConfigError(f"{key}={_shown(value)}: expected {expected}")


def check_types(cfg: DictConfig, defaults: Mapping[str, Any]) -> None:
    """Raise ConfigError on the first key whose value breaks its rule, naming key, value and what is expected.

    `defaults` maps dotted keys to default.yaml's values (for keys without a rule). A section of default.yaml
    (`model`, `trainer`, ...) stays a section, and a plain value (`seed`, `checkpoint.keep`) takes no sub-keys.
    """
    _check_sections(cfg, defaults)
    for key, value in flat_items(cfg):
        if key.startswith("trainer."):
            name = key.removeprefix("trainer.")
            allowed = trainer_arguments()
            if "." in name and name.split(".")[0] in allowed:
                _refuse_sub_key(key, f"trainer.{name.split('.')[0]}")
            if name in TRAINER_SET_BY_TRAIN_PY:
                raise ConfigError(f"{key} cannot be set: {TRAINER_SET_BY_TRAIN_PY[name]}")
            if name not in allowed:
                valid = ", ".join(k for k in allowed if k not in TRAINER_SET_BY_TRAIN_PY)
                raise ConfigError(f"unknown key '{key}': not an argument of lightning.Trainer. Valid trainer.* "
                                  f"keys: {valid}")
            rule = RULES.get(key, allowed[name])
        elif key == "data.eval":
            _check_catalog(value)
            continue
        elif key not in defaults:
            parts = key.split(".")
            parent = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)
                           if ".".join(parts[:i]) in defaults), None)
            if parent is not None:
                _refuse_sub_key(key, parent)
            raise ConfigError(f"unknown key '{key}'")
        else:
            rule = RULES.get(key) or _default_rule(defaults.get(key))
        if not rule.ok(value):
            _refuse(key, value, rule.expected)


def _refuse_sub_key(key: str, parent: str) -> None:
    rule = RULES.get(parent) or (trainer_arguments().get(parent.removeprefix("trainer.")) if
                                 parent.startswith("trainer.") else None)
    what = f" ({rule.expected})" if rule is not None and rule is not ANY else ""
    raise ConfigError(f"{key}: {parent} is a plain value{what} and has no sub-keys; expected {parent}=<value>")


def _check_sections(cfg: DictConfig, defaults: Mapping[str, Any]) -> None:
    """Refuse a section of default.yaml replaced by a plain value (`trainer=null`, `model=5`)."""
    sections = sorted({".".join(key.split(".")[:i]) for key in defaults for i in range(1, key.count(".") + 1)},
                      key=lambda name: (name.count("."), name))
    for section in sections:
        try:
            value = OmegaConf.select(cfg, section, throw_on_missing=False)
        except OmegaConfBaseException as err:
            raise ConfigError(f"{section}: cannot resolve its value ({str(err).splitlines()[0]})") from None
        if not isinstance(value, DictConfig):
            keys = [k for k in defaults if k.startswith(f"{section}.")]
            raise ConfigError(f"{section}={_shown(_plain(value))}: {section} is a section; expected its keys, e.g. "
                              f"{keys[0]}=<value> (keys: {', '.join(k.removeprefix(section + '.') for k in keys)})")


def _check_catalog(catalog: Any) -> None:
    if not isinstance(catalog, dict):
        _refuse("data.eval", catalog, "the catalog of eval sets, e.g. data.eval.mine.source=file")
    for name, entry in catalog.items():
        if not isinstance(entry, dict):
            _refuse(f"data.eval.{name}", entry, f"a mapping with source ({', '.join(SOURCES)}) and its fields")
        if "source" not in entry:
            _refuse(f"data.eval.{name}", entry, f"a source: data.eval.{name}.source=<{'|'.join(SOURCES)}>")
        for field, rule in CATALOG_FIELDS.items():
            if field in entry and not rule.ok(entry[field]):
                _refuse(f"data.eval.{name}.{field}", entry[field], rule.expected)
        if entry["source"] == "file" and not entry.get("path"):
            _refuse(f"data.eval.{name}.path", entry.get("path"), "a file path for source 'file'")
        if entry["source"] == "hf" and not entry.get("path"):
            _refuse(f"data.eval.{name}.path", entry.get("path"), "a Hugging Face dataset id for source 'hf'")

