"""Results rows that follow exact, hand-solvable laws in model size, and the tables they must give.

Three models of size x_k = 1e4 * e**k (k = 0, 1, 2), so log x is 0, 1, 2 plus a constant. Per component,
log|M| is linear in k (an exact power law: R^2 = 1, alpha = the slope) except Error-Entropy, whose log is
0, 0, 0.2 (+ log 2): the least-squares slope of (0, 0, s) on (0, 1, 2) is s/2 and R^2 = 1 - (1/6)/(2/3) = 0.75
for any s != 0 (residuals s(1/6, -1/3, 1/6), total sum of squares 2s^2/3).
"""

from __future__ import annotations

import math

SIZES = [1e4 * math.exp(k) for k in range(3)]
FAMILY = "toy"
DATASET = "wiki"

# (scale, log-slope per k) of each component; EE is handled apart (the kinked series)
LAST = {"cross_entropy": (3.0, -0.1), "self_alignment": (0.5, 0.3), "confidence": (-0.7, -0.05)}
EE_SCALE, EE_KINK = 2.0, 0.2

# Tables 1 and 2 by hand: R^2 1 except EE's 0.75; |Delta_M| = |alpha_M - alpha_CE|, alpha_EE = 0.2 / 2
R2 = {"CE": 1.0, "EE": 0.75, "SA": 1.0, "Conf": 1.0}
ALPHA = {"CE": -0.1, "EE": 0.1, "SA": 0.3, "Conf": -0.05}
DELTA = {"EE": 0.2, "SA": 0.4, "Conf": 0.05}
# at step 50 only CE differs: slope -0.3, so |Delta| = |alpha_M + 0.3|
DELTA_STEP_50 = {"EE": 0.4, "SA": 0.6, "Conf": 0.25}


def rows(ce_slope: float = -0.1, step: int = 100, family: str = FAMILY) -> list[dict]:
    """One row per model (dataset DATASET) at `step`, CE following `ce_slope`."""
    laws = {**LAST, "cross_entropy": (3.0, ce_slope)}
    out = []
    for k, size in enumerate(SIZES):
        row = {"model": f"org/{family}-{k}", "family": family, "revision": f"step{step}", "step": step,
               "dataset": DATASET, "num_tokens": 1000, "non_embedding_params": size}
        for name, (scale, slope) in laws.items():
            row[name] = scale * math.exp(slope * k)
        row["error_entropy"] = EE_SCALE * math.exp(EE_KINK if k == 2 else 0.0)
        out.append(row)
    return out


def history() -> list[dict]:
    """A results file's rows: step 50, a first step-100 pass with wrong numbers, then the rerun of step 100
    (same model, revision and dataset; a later line, so it replaces the first)."""
    stale = [{**r, "cross_entropy": r["cross_entropy"] * 5 ** k} for k, r in enumerate(rows())]
    return rows(ce_slope=-0.3, step=50) + stale + rows()


def table_cells(text: str, title: str) -> dict[str, str]:
    """`{component: cell}` of the FAMILY row of the table titled `title` in the CLI's or notebook's output."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [title])
    components = lines[start + 1].split()
    row = next(line.split() for line in lines[start + 2:] if line.split()[:1] == [FAMILY])
    return dict(zip(components, row[1:]))


def cells(values: dict[str, float], best: str) -> dict[str, str]:
    """Expected printed cells: 4 decimals, '*' on the best."""
    return {k: f"{v:.4f}" + ("*" if k == best else "") for k, v in values.items()}
