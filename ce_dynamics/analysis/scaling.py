"""Power-law fits of cross-entropy and its components against model size (paper sec. 4.2).

For every metric M in {CE, EE, SA, Conf} and a set of models, fit ``log|M| = c_M + alpha_M log N``
(paper eq. 9, N = non-embedding parameters) and report the goodness of fit R^2 (Table 1) and the exponent
gap ``|Delta_M| = |alpha_M - alpha_CE|`` (Table 2), per model family and dataset.

Command line: ``python -m ce_dynamics.analysis results.jsonl [--out DIR]`` (``ce_dynamics.analysis.report``) prints
both tables and writes the scaling figures (paper figs. 7 and 8) as PNG next to the results.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ce_dynamics.files import ResultsError, iter_result_rows, load_state, state_files

__all__ = [
    "COMPONENTS",
    "SHORT_NAMES",
    "PowerLawFit",
    "ResultsError",
    "ScalingTable",
    "component_shares",
    "dataset_order",
    "decompose_arrays",
    "exponent_gaps",
    "family_of",
    "fit_power_law",
    "fit_groups",
    "in_unit",
    "load_arrays",
    "load_results",
    "main",
    "non_embedding_params",
    "r2_table",
    "delta_table",
    "select_final",
]

COMPONENTS = ("cross_entropy", "error_entropy", "self_alignment", "confidence")
SHORT_NAMES = {"cross_entropy": "CE", "error_entropy": "EE", "self_alignment": "SA", "confidence": "Conf"}
ALL_GROUP = "All"  # the row of a table that pools every family


# --------------------------------------------------------------------------------------------- readers

REQUIRED_FIELDS = ("model", "dataset", "non_embedding_params", *COMPONENTS)
_KNOWN_FAMILIES = ("pythia", "gpt2", "opt", "qwen", "llama", "mistral", "bloom", "olmo", "gemma", "falcon", "phi")
_FAMILY_NAMES = {"gpt2": "gpt-1/2"}  # Table 4 groups GPT-1 and GPT-2
# The paper's Table 4, by model name (the hub id's last part, lower case): family_of follows it first.
PAPER_FAMILIES = {
    **dict.fromkeys(("openai-gpt", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"), "gpt-1/2"),
    **dict.fromkeys(("opt-125m", "opt-350m", "opt-1.3b", "opt-2.7b", "opt-6.7b"), "opt"),
    **dict.fromkeys(("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-72b"), "qwen"),
    **dict.fromkeys(("pythia-14m", "pythia-31m", "pythia-70m", "pythia-160m", "pythia-410m", "pythia-1.4b",
                     "pythia-2.8b", "pythia-6.9b"), "pythia"),
    **dict.fromkeys(("llama-3.2-1b", "llama-3.2-3b", "llama-7b", "meta-llama-3-8b", "llama-2-13b-hf",
                     "llama-2-70b-hf"), "llama"),
    "mistral-7b-v0.1": "mistral",
    "distilgpt2": "others",
}


def load_results(path: str | Path) -> list[dict]:
    """Read a ``results.jsonl`` (one JSON object per line, DESIGN.md rows) and check every row.

    Each row needs ``model``, ``dataset``, ``non_embedding_params`` (> 0) and finite numbers for
    ``cross_entropy``, ``error_entropy``, ``self_alignment``, ``confidence``; ``step`` and ``family`` are
    optional. Raises ``ResultsError`` naming the file and line of the first bad row.
    """
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"results file not found: {path}")
    rows = []
    for lineno, row in iter_result_rows(path):
        where = f"{path}:{lineno}"
        missing = [k for k in REQUIRED_FIELDS if k not in row]
        if missing:
            raise ResultsError(f"{where}: missing field(s) {missing}; every row needs {list(REQUIRED_FIELDS)}")
        size = row["non_embedding_params"]
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not size > 0:
            raise ResultsError(f"{where}: non_embedding_params must be a positive number, got {size!r}")
        for key in COMPONENTS:
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ResultsError(f"{where}: {key} must be a finite number, got {value!r}")
        rows.append(row)
    if not rows:
        raise ResultsError(f"{path}: no result rows")
    return rows


def select_final(rows: Iterable[Mapping], step: int | None = None) -> list[dict]:
    """One row per (model, dataset): the one at ``step``, or else the highest ``step`` (later lines win
    ties, so a rerun's row replaces an older one). Scaling compares models at the end of training."""
    chosen: dict[tuple[str, str], Mapping] = {}
    for row in rows:
        if step is not None and row.get("step") != step:
            continue
        key = (str(row["model"]), str(row["dataset"]))
        old = chosen.get(key)
        if old is None or (row.get("step") or 0) >= (old.get("step") or 0):
            chosen[key] = row
    if not chosen:
        raise ResultsError(f"no result rows at step {step}")
    return [dict(r) for r in chosen.values()]


def family_of(row: Mapping | str) -> str:
    """Model family of a row (its ``family`` field if present) or of a hub id.

    The paper's Table 4 first (``openai-gpt`` and ``gpt2-xl`` -> ``gpt-1/2``, ``distilgpt2`` -> ``others``),
    then by name: ``EleutherAI/pythia-1b`` -> ``pythia``, ``Qwen/Qwen2-7B`` -> ``qwen``,
    ``meta-llama/Llama-3.1-8B`` -> ``llama``; otherwise the name's first word without its version.
    """
    if isinstance(row, Mapping):
        if row.get("family"):
            return str(row["family"])
        row = str(row["model"])
    name = row.rstrip("/").rsplit("/", 1)[-1].lower()
    if name in PAPER_FAMILIES:
        return PAPER_FAMILIES[name]
    words = [w for w in re.split(r"[-_ ]", name) if w]
    for word in words:
        base = re.sub(r"[\d.]+$", "", word)
        if word in _KNOWN_FAMILIES or base in _KNOWN_FAMILIES:
            found = word if word in _KNOWN_FAMILIES else base
            return _FAMILY_NAMES.get(found, found)
    first = words[0] if words else name
    return re.sub(r"[\d.]+$", "", first) or first


SHARE_CONVENTIONS = ("absolute", "signed")


def component_shares(row: Mapping[str, float], convention: str = "absolute") -> dict[str, float]:
    """Each component's share of the loss (paper fig. 8), as fractions.

    ``absolute`` (default): ``|M| / (|EE| + |SA| + |Conf|)``; the three shares are non-negative and sum to 1,
    as the paper's fig. 8 reads. ``signed``: ``M / CE``; Confidence enters CE with a minus sign
    (CE = EE + SA - Conf), so ``EE/CE + SA/CE - Conf/CE = 1``.
    """
    if convention not in SHARE_CONVENTIONS:
        raise ValueError(f"convention must be one of {SHARE_CONVENTIONS}, got {convention!r}")
    if convention == "signed":
        ce = float(row["cross_entropy"])
        if ce == 0.0:
            raise ValueError("component shares are undefined when cross_entropy is 0")
        return {k: float(row[k]) / ce for k in COMPONENTS[1:]}
    total = sum(abs(float(row[k])) for k in COMPONENTS[1:])
    if total == 0.0:
        raise ValueError("component shares are undefined when |EE| + |SA| + |Conf| is 0")
    return {k: abs(float(row[k])) / total for k in COMPONENTS[1:]}


def load_arrays(path: str | Path) -> dict[str, dict[int, dict[str, np.ndarray]]]:
    """Read saved metric state: ``{dataset: {step: {"rank_counts", "rank_log_score_sum"}}}``.

    ``path`` is a run directory holding ``arrays/<dataset>/step_<N>.npz`` or the ``arrays`` folder itself.
    Turn states into numbers with :func:`decompose_arrays`.
    """
    root = Path(path)
    folder = root / "arrays" if (root / "arrays").is_dir() else root
    out: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    if folder.is_dir():
        for dataset_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
            for step, file in state_files(dataset_dir).items():
                data = load_state(file)  # DamagedFileError (a ResultsError) names a file that cannot be read
                state = {key: data[key] for key in data  # the bootstrap's per-group arrays too
                         if key in ("rank_counts", "rank_log_score_sum") or key.startswith("bootstrap_")}
                out.setdefault(dataset_dir.name, {})[step] = state
    if not out:
        raise ResultsError(f"no arrays/<dataset>/step_<N>.npz files under {root} (a training run's output_dir holds "
                           f"arrays/; a replay keeps them per model, in output_dir/<model slug>/arrays/)")
    return {d: dict(sorted(steps.items())) for d, steps in out.items()}


@dataclass(frozen=True)
class PowerLawFit:
    """Least-squares line ``log|y| = intercept + alpha * log x`` (natural logs) and its R^2."""

    alpha: float
    intercept: float
    r2: float
    num_points: int

    def predict(self, x: np.ndarray | float) -> np.ndarray:
        """|y| the fitted power law gives at ``x``."""
        return np.exp(self.intercept) * np.asarray(x, dtype=np.float64) ** self.alpha


def fit_power_law(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> PowerLawFit:
    """Fit ``log|y| = c + alpha log x`` by ordinary least squares (paper eq. 9).

    ``|y|`` because a component may be negative (Confidence is log C, negative when C < 1); the paper fits
    ``log|M|``. R^2 is ``1 - SS_res / SS_tot`` in log space; when every ``log|y|`` is equal (to rounding)
    the flat line is exact and R^2 is 1.
    """
    xs = np.asarray(x, dtype=np.float64).reshape(-1)
    ys = np.asarray(y, dtype=np.float64).reshape(-1)
    if xs.shape != ys.shape:
        raise ValueError(f"x and y must have the same length, got {xs.size} and {ys.size}")
    if xs.size < 2:
        raise ValueError(f"a power-law fit needs at least 2 points, got {xs.size}")
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
        raise ValueError("x and y must be finite (no NaN or inf)")
    if np.any(xs <= 0):
        raise ValueError(f"x must be positive (model sizes), got {xs[xs <= 0].tolist()}")
    if np.any(ys == 0):
        raise ValueError("y must be non-zero: log|y| is undefined at 0")
    lx, ly = np.log(xs), np.log(np.abs(ys))
    dx = lx - lx.mean()
    sxx = float(dx @ dx)
    if sxx == 0.0:
        raise ValueError("x needs at least 2 distinct values to fit a slope")
    alpha = float(dx @ (ly - ly.mean())) / sxx
    intercept = float(ly.mean() - alpha * lx.mean())
    residual = ly - (intercept + alpha * lx)
    ss_res = float(residual @ residual)
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    # A constant log|y| (up to rounding) is fitted exactly by a flat line: R^2 = 1, not 0/0.
    constant = ss_tot <= (64 * np.finfo(np.float64).eps) ** 2 * float(ly @ ly)
    r2 = 1.0 if constant else 1.0 - ss_res / ss_tot
    return PowerLawFit(alpha=alpha, intercept=intercept, r2=r2, num_points=int(xs.size))


def exponent_gaps(fits: Mapping[str, PowerLawFit]) -> dict[str, float]:
    """``|Delta_M| = |alpha_M - alpha_CE|`` for every component M other than cross-entropy (Table 2)."""
    if "cross_entropy" not in fits:
        raise ValueError(f"exponent gaps need a 'cross_entropy' fit, got {sorted(fits)}")
    base = fits["cross_entropy"].alpha
    return {name: abs(fit.alpha - base) for name, fit in fits.items() if name != "cross_entropy"}


def non_embedding_params(model: "torch.nn.Module") -> int:  # noqa: F821
    """Parameters outside the embedding tables and the output unembedding (paper Table 4 convention).

    Excluded: the token embedding (``get_input_embeddings()``), the output unembedding
    (``get_output_embeddings()``) and any other ``nn.Embedding`` (learned position embeddings: GPT-2's
    ``wpe``, OPT's ``embed_positions``), which is how Table 4 counts gpt2 and opt-125m at 85,056,000.
    Each parameter is counted once, so tied input/output embeddings are handled. Works on the meta device.
    """
    import torch

    excluded: set[int] = set()
    modules = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        module = fn() if callable(fn) else None
        if module is not None:
            modules.append(module)
    for module in modules:
        excluded.update(id(p) for p in module.parameters())
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already yields each shared tensor once
        if id(p) in excluded or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return int(total)


def decompose_arrays(arrays: Mapping[str, Mapping[int, Mapping[str, np.ndarray]]]) -> dict[str, dict[int, dict]]:
    """Numbers for every (dataset, step) state from :func:`load_arrays`, via the core's one implementation.

    Returns ``{dataset: {step: {KEYS..., "num_tokens", "p_e", "q_e"}}}`` with Python floats for the scalars
    and numpy arrays for ``p_e``/``q_e``; states saved with the bootstrap on also give its intervals
    (``<key>_se``, ``_lo``, ``_hi``, ...: :func:`ce_dynamics.bootstrap.summary_of_state`).
    """
    import torch

    from ce_dynamics.bootstrap import summary_of_state
    from ce_dynamics.functional import decomposition_from_state

    out: dict[str, dict[int, dict]] = {}
    for dataset, steps in arrays.items():
        out[dataset] = {}
        for step, state in sorted(steps.items()):
            result = decomposition_from_state(
                torch.from_numpy(np.asarray(state["rank_counts"], dtype=np.int64)),
                torch.from_numpy(np.asarray(state["rank_log_score_sum"], dtype=np.float64)),
            )
            result.update(summary_of_state(state, keep_replicates=True))
            out[dataset][step] = {
                k: v if k == "replicates" else (v.numpy() if v.dim() > 0 else v.item()) for k, v in result.items()
            }
    return out


# ---------------------------------------------------------------------------------------------- tables


def fit_groups(rows: Iterable[Mapping], min_models: int = 3) -> dict[str, dict[str, dict[str, PowerLawFit]]]:
    """Fits per group (each family with ``>= min_models`` models, then "All" when there are several
    families), per dataset, per component: ``{group: {dataset: {component: PowerLawFit}}}``.

    ``rows`` must hold one row per (model, dataset) (see :func:`select_final`). Raises ``ResultsError``
    when no group has enough models, naming how many each family has.
    """
    fits: dict[str, dict[str, dict[str, PowerLawFit]]] = {}
    for group, per_dataset in group_rows(rows, min_models).items():
        fits[group] = {}
        for dataset, subset in per_dataset.items():
            x = [r["non_embedding_params"] for r in subset]
            fits[group][dataset] = {c: _fit_or_raise(x, [r[c] for r in subset], group, dataset, c) for c in COMPONENTS}
    return fits


def group_rows(rows: Iterable[Mapping], min_models: int = 3) -> dict[str, dict[str, list[Mapping]]]:
    """The rows of each fit of :func:`fit_groups`: ``{group: {dataset: rows}}`` (families with ``>= min_models``
    models, then "All" when there are several); ``ResultsError`` when no group has enough models."""
    if min_models < 2:
        raise ValueError(f"min_models must be >= 2, got {min_models}")
    rows = list(rows)
    by_group: dict[str, list[Mapping]] = {}
    for row in rows:
        by_group.setdefault(family_of(row), []).append(row)
    groups = {g: r for g, r in sorted(by_group.items()) if _num_models(r) >= min_models}
    if len(by_group) > 1 and _num_models(rows) >= min_models:
        groups[ALL_GROUP] = rows
    if not groups:
        counts = ", ".join(f"{g}: {_num_models(r)}" for g, r in sorted(by_group.items())) or "no rows"
        raise ResultsError(
            f"too few models for a power-law fit: need at least {min_models} models of distinct size in a "
            f"family (models per family: {counts})"
        )
    out: dict[str, dict[str, list[Mapping]]] = {}
    for group, members in groups.items():
        out[group] = {}
        for dataset in dataset_order(members):
            subset = [r for r in members if r["dataset"] == dataset]
            if _num_models(subset) >= min_models:
                out[group][dataset] = subset
    return out


def dataset_order(rows: Iterable[Mapping]) -> list[str]:
    """Dataset names in the order they first appear in ``rows`` (the order the run evaluated them)."""
    return list(dict.fromkeys(str(r["dataset"]) for r in rows))


def _num_models(rows: Sequence[Mapping]) -> int:
    return len({r["non_embedding_params"] for r in rows})


def _fit_or_raise(x: list, y: list, group: str, dataset: str, component: str) -> PowerLawFit:
    if min(y) < 0 < max(y):
        warnings.warn(
            f"{component} changes sign across the models of {group}/{dataset} (from {min(y):.4g} to {max(y):.4g}): "
            "its power law is fitted to |value|, which reads a sign change as a fall to 0 and a rise",
            stacklevel=3,
        )
    try:
        return fit_power_law(x, y)
    except ValueError as err:
        raise ResultsError(f"cannot fit {component} for {group}/{dataset}: {err}") from err


@dataclass(frozen=True)
class ScalingTable:
    """A Table 1/2 style table: ``values[group][dataset][short component name]``; higher is better for
    R^2 and lower is better for |Delta|."""

    title: str
    components: tuple[str, ...]
    datasets: tuple[str, ...]
    values: dict[str, dict[str, dict[str, float]]]
    higher_is_better: bool

    def best(self, group: str, dataset: str) -> str | None:
        """The short component name with the best value in this (row, dataset) block."""
        block = {k: v for k, v in self.values[group].get(dataset, {}).items() if not math.isnan(v)}
        if not block:
            return None
        pick = max if self.higher_is_better else min
        return pick(block, key=block.__getitem__)

    def format(self) -> str:
        """Plain-text table: families as rows, datasets x components as columns, best per block with '*'."""
        width = 9
        head1 = f"{self.title:<14}" + "".join(
            f"{d[: width * len(self.components) - 1]:<{width * len(self.components)}}" for d in self.datasets
        )
        head2 = " " * 14 + "".join(f"{c:>{width}}" for _ in self.datasets for c in self.components)
        lines = [head1.rstrip(), head2]
        for group, per_dataset in self.values.items():
            cells = []
            for d in self.datasets:
                best = self.best(group, d)
                for c in self.components:
                    v = per_dataset.get(d, {}).get(c, float("nan"))
                    text = "-" if math.isnan(v) else f"{v:.4f}" + ("*" if c == best else " ")
                    cells.append(f"{text:>{width}}")
            lines.append(f"{group:<14}" + "".join(cells))
        return "\n".join(lines)


def r2_table(fits: Mapping[str, Mapping[str, Mapping[str, PowerLawFit]]]) -> ScalingTable:
    """Table 1: R^2 of the power-law fit of CE, EE, SA and Conf, per group and dataset."""
    datasets = tuple(dict.fromkeys(d for per in fits.values() for d in per))
    values = {
        g: {d: {SHORT_NAMES[c]: f.r2 for c, f in per_c.items()} for d, per_c in per.items()} for g, per in fits.items()
    }
    return ScalingTable("R^2", tuple(SHORT_NAMES[c] for c in COMPONENTS), datasets, values, True)


def delta_table(fits: Mapping[str, Mapping[str, Mapping[str, PowerLawFit]]]) -> ScalingTable:
    """Table 2: |Delta_M| = |alpha_M - alpha_CE| for EE, SA and Conf, per group and dataset."""
    datasets = tuple(dict.fromkeys(d for per in fits.values() for d in per))
    values = {
        g: {d: {SHORT_NAMES[c]: v for c, v in exponent_gaps(per_c).items()} for d, per_c in per.items()}
        for g, per in fits.items()
    }
    return ScalingTable("|Delta|", tuple(SHORT_NAMES[c] for c in COMPONENTS[1:]), datasets, values, False)


# ------------------------------------------------------------------------------------------------- CLI

UNITS = {"nats": "nats per token", "bpb": "bits per UTF-8 byte"}


def in_unit(rows: Iterable[Mapping], unit: str) -> list[dict]:
    """The rows with the four components in `unit`: "nats" as they are, "bpb" taken from the rows'
    ``<component>_bpb`` fields (bits per byte: tokenizers of different families compare on the same text)."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    rows = [dict(r) for r in rows]
    if unit == "nats":
        return rows
    for row in rows:
        missing = [f"{c}_bpb" for c in COMPONENTS if f"{c}_bpb" not in row]
        if missing:
            raise ResultsError(f"row of {row['model']} on {row['dataset']} has no {', '.join(missing)}: bits per byte "
                               f"need rows written by a replay that knows the eval text's bytes")
        for c in COMPONENTS:
            value = row[f"{c}_bpb"]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ResultsError(f"{c}_bpb of {row['model']} on {row['dataset']} must be a finite number, got {value!r}")
            row[c] = float(value)
    return rows
