"""Out-of-sample test of the scaling laws: fit on all but the K largest models, predict the held-out ones.

For each fit group and dataset, every component's power law is fitted on the smaller models and extrapolated to
the K largest. Cross-entropy is predicted twice: by its own law ("CE direct") and assembled from the fitted
components, ``EE + SA - Conf`` ("CE assembled"): the paper's claim that the components scale more cleanly is then
a prediction that can fail. The error of a prediction is its mean absolute error over the held-out models
(nats per token, or the rows' unit). Intervals come from repeating the whole fit-and-predict on every paired
bootstrap replicate (``ce_dynamics.analysis.uncertainty``): replicate b of every model, fitted and held out alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ce_dynamics.analysis.scaling import COMPONENTS, SHORT_NAMES, ResultsError, group_rows
from ce_dynamics.analysis.uncertainty import Interval, fit_lines, interval, replicate_matrix

PREDICTIONS = ("ce_direct", "ce_assembled", *COMPONENTS[1:])
LABELS = {"ce_direct": "CE direct", "ce_assembled": "CE assembled", **{c: SHORT_NAMES[c] for c in COMPONENTS[1:]}}


@dataclass(frozen=True)
class Holdout:
    """One (group, dataset): which models were held out, what each law predicted for them, and the errors."""

    group: str
    dataset: str
    train_sizes: list[float]
    test_sizes: list[float]
    train_values: dict[str, list[float]]  # per component, the fitted models' values
    actual: dict[str, list[float]]  # per component, the held-out models' values
    predicted: dict[str, list[float]]  # per prediction (PREDICTIONS), at the held-out sizes
    errors: dict[str, Interval]  # mean absolute error over the held-out models, per prediction
    assembled_gain: Interval  # error(CE direct) - error(CE assembled): > 0 when assembling predicts better

    def verdict(self) -> str:
        return self.assembled_gain.verdict("assembled better", "direct better")


def _predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """Signed predictions ``[B, test]`` from power laws fitted to each row of ``y_train`` ``[B, train]``: the
    law of ``|y|``, with the sign of the largest training model's value."""
    alpha, intercept, _ = fit_lines(x_train, y_train)
    sign = np.sign(y_train[:, -1:])
    return sign * np.exp(intercept[:, None] + alpha[:, None] * np.log(x_test)[None, :])


def _errors(values: Mapping[str, np.ndarray], train: np.ndarray, test: np.ndarray, x: np.ndarray
            ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per prediction: predictions ``[B, test]`` and mean absolute errors ``[B]`` for component values
    ``{component: [B, models]}`` (sorted by size)."""
    pred = {c: _predict(x[train], values[c][:, train], x[test]) for c in COMPONENTS}
    preds = {"ce_direct": pred["cross_entropy"],
             "ce_assembled": pred["error_entropy"] + pred["self_alignment"] - pred["confidence"],
             **{c: pred[c] for c in COMPONENTS[1:]}}
    truth = {"ce_direct": values["cross_entropy"], "ce_assembled": values["cross_entropy"],
             **{c: values[c] for c in COMPONENTS[1:]}}
    errors = {k: np.abs(p - truth[k][:, test]).mean(1) for k, p in preds.items()}
    return preds, errors


def holdout(rows: Iterable[Mapping], k: int, min_models: int = 3) -> list[Holdout]:
    """The hold-out test for every fit group and dataset with at least ``k + 2`` models of distinct size (two to
    fit a line, ``k`` to predict); ``ResultsError`` when none has."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"--holdout needs a positive number of models, got {k!r}")
    try:
        groups = group_rows(rows, max(min_models, k + 2))
    except ResultsError as err:
        raise ResultsError(f"--holdout {k} needs {k + 2} models of distinct size in a family (2 to fit, {k} to "
                           f"predict): {err}") from None
    out = []
    for group, per_dataset in groups.items():
        for dataset, subset in per_dataset.items():
            subset = sorted(subset, key=lambda r: float(r["non_embedding_params"]))
            x = np.asarray([float(r["non_embedding_params"]) for r in subset])
            largest = sorted(set(x))[-k:]
            test = np.isin(x, largest)
            train = ~test
            if len(set(x[train])) < 2:
                continue
            point = {c: np.asarray([[float(r[c]) for r in subset]]) for c in COMPONENTS}
            preds, errors = _errors(point, train, test, x)
            reps = {c: replicate_matrix(subset, c) for c in COMPONENTS}
            if all(r is not None for r in reps.values()):
                _, draws = _errors(reps, train, test, x)  # type: ignore[arg-type]
            else:
                draws = {key: np.full(0, np.nan) for key in errors}
            out.append(Holdout(
                group, dataset, x[train].tolist(), x[test].tolist(),
                {c: point[c][0, train].tolist() for c in COMPONENTS},
                {c: point[c][0, test].tolist() for c in COMPONENTS},
                {key: p[0].tolist() for key, p in preds.items()},
                {key: interval(float(errors[key][0]), draws[key]) for key in PREDICTIONS},
                interval(float(errors["ce_direct"][0] - errors["ce_assembled"][0]),
                         draws["ce_direct"] - draws["ce_assembled"]),
            ))
    if not out:
        raise ResultsError(f"--holdout {k}: no family has the {k + 2} models of distinct size it needs "
                           f"(2 to fit, {k} to predict)")
    return out


def holdout_table(results: Sequence[Holdout]) -> str:
    """Text: per group and dataset, the mean absolute prediction error of each law on the held-out models,
    with 95% intervals, and whether CE assembled from the components beats CE's own law outside the noise."""
    lines = []
    for h in results:
        held = ", ".join(f"{s:.3g}" for s in h.test_sizes)
        lines.append(f"{h.group} / {h.dataset}: fitted on {len(h.train_sizes)} models, predicting {held} "
                     f"(mean |error|, 95% interval)")
        for key in PREDICTIONS:
            lines.append(f"  {LABELS[key]:<13} {h.errors[key].format()}")
        lines.append(f"  error(CE direct) - error(CE assembled) = {h.assembled_gain.format(signed=True)}: "
                     f"{h.verdict()}")
    return "\n".join(lines)
