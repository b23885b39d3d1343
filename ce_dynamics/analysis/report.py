"""The scaling report for a results file: Tables 1-2 printed, figs. 7-8 written as PNG; then each law with 95%
intervals from the paired bootstrap (when the rows carry replicates) and which component's law is better, by how
much and whether outside the noise; with ``--holdout K``, the out-of-sample test on the K largest models.

``python -m ce_dynamics.analysis RESULTS.jsonl`` and ``ce-dynamics scaling RESULTS.jsonl`` run :func:`main`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ce_dynamics.analysis.scaling import (
    UNITS,
    ResultsError,
    delta_table,
    fit_groups,
    in_unit,
    load_results,
    r2_table,
    select_final,
)
from ce_dynamics.analysis.holdout import holdout, holdout_table
from ce_dynamics.analysis.uncertainty import compare, comparison_table


def main(argv: Sequence[str] | None = None) -> int:
    """Print Tables 1-2 for a results file and write figs. 7-8 as PNG; exit 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m ce_dynamics.analysis",
        description="Power-law fits of cross-entropy and its components against non-embedding parameters.",
    )
    parser.add_argument("results", type=Path, help="results.jsonl (one row per model, revision, dataset)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: next to results)")
    parser.add_argument("--step", type=int, default=None, help="use rows at this training step (default: last)")
    parser.add_argument("--min-models", type=int, default=3, help="models a family needs for a fit (>= 2)")
    parser.add_argument("--no-figures", action="store_true", help="print the tables only")
    parser.add_argument("--unit", choices=UNITS, default="nats",
                        help="nats per token (default) or bits per byte (the rows' *_bpb fields)")
    parser.add_argument("--holdout", type=int, default=None, metavar="K",
                        help="fit on all but the K largest models and report how well each law predicts them")
    args = parser.parse_args(argv)
    try:
        rows = in_unit(select_final(load_results(args.results), step=args.step), args.unit)
        fits = fit_groups(rows, min_models=args.min_models)
        comparisons = compare(rows, min_models=args.min_models) if args.unit == "nats" else []
        held = holdout(rows, args.holdout, args.min_models) if args.holdout is not None else []
    except (ResultsError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(r2_table(fits).format())
    print()
    print(delta_table(fits).format())
    print("\n'*' marks the best value per family and dataset (highest R^2, smallest |Delta|).")
    print(f"Components in {UNITS[args.unit]}.")
    if comparisons:  # the replicates are in nats: intervals for the nats tables only
        print()
        print(comparison_table(comparisons))
    if held:
        print()
        print(f"Hold-out: the {args.holdout} largest model(s) predicted from the others' laws")
        print(holdout_table(held))
    if not args.no_figures:
        from ce_dynamics.analysis import figures  # matplotlib only when drawing

        out = args.out if args.out is not None else args.results.parent
        paths = figures.save_scaling_figures(rows, fits, out, unit=args.unit)
        if held:
            paths.append(figures.save_holdout_figure(held, out / "holdout.png", unit=args.unit))
        for path in paths:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
