"""The bootstrap's numbers reach every sink: W&B and the CSV (`decomp/<D>/<key>_se|_lo|_hi`, equal to what the saved
npz state recomputes), the Hugging Face Trainer's `evaluate()` (`eval_<key>_se`, ...) and the end-of-run summary."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from ce_dynamics import CrossEntropyDecomposition
from ce_dynamics.bootstrap import BOOTSTRAP_KEYS, SUFFIXES, interval_keys, summary_of_state
from ce_dynamics.files import load_state, save_state
from ce_dynamics.runs.summary import summary_text
from test_callback import NAMES, _decomp_rows, fitted  # noqa: F401 - fitted is a fixture

LOGGED = [f"{key}{suffix}" for key in BOOTSTRAP_KEYS for suffix in SUFFIXES]


def test_wandb_and_csv_rows_carry_the_intervals_the_saved_state_recomputes(fitted):  # noqa: F811
    rows = _decomp_rows(fitted["history"])
    with open(fitted["csv"]) as fh:
        csv_rows = {int(r["step"]): r for r in csv.DictReader(fh) if r.get("decomp/alpha/cross_entropy_se")}
    assert sorted(rows) == sorted(csv_rows) == [3, 6]
    for step, row in rows.items():
        for name in NAMES:
            recomputed = summary_of_state(load_state(fitted["tmp"] / "out" / "arrays" / name / f"step_{step}.npz"))
            for key in LOGGED:
                assert row[f"decomp/{name}/{key}"] == float(recomputed[key]), (step, name, key)
                assert float(csv_rows[step][f"decomp/{name}/{key}"]) == float(recomputed[key]), (step, name, key)
            lo, hi = row[f"decomp/{name}/error_entropy_lo"], row[f"decomp/{name}/error_entropy_hi"]
            assert lo < hi and row[f"decomp/{name}/error_entropy_se"] > 0
    last = fitted["callback"].last_results["alpha"]
    assert all(key in last for key in interval_keys())


def test_the_summary_prints_each_value_with_its_standard_error(tmp_path):
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(30, 10, 17, generator=g) * 3, torch.randint(0, 17, (30, 10), generator=g)
    metric = CrossEntropyDecomposition(17, bootstrap=50)
    metric.update(logits, target, torch.arange(30))
    out = metric.compute()
    save_state(tmp_path, "code", 8, {"rank_counts": metric.rank_counts, "rank_log_score_sum": metric.rank_log_score_sum,
                                     **metric.bootstrap_state()})
    text = summary_text("train", tmp_path)
    for key in ("cross_entropy", "error_entropy", "self_alignment", "confidence"):
        assert f"{float(out[key]):.4f} +- {float(out[key + '_se']):.4f}" in text, (key, text)


def test_hf_evaluate_gives_eval_key_se_lo_hi_as_the_metric_over_the_same_rows(tmp_path):
    pytest.importorskip("accelerate")
    from test_integrations_transformers import Sequences, make_trainer

    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=67, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32,
                                             max_position_embeddings=64)).eval()
    data = Sequences(1, 10)
    for batch_eval_metrics in (False, True):
        trainer, _ = make_trainer(model, tmp_path / str(batch_eval_metrics), data, batch_eval_metrics)
        metrics = trainer.evaluate()
        with torch.no_grad():
            logits = model(input_ids=data.ids).logits[:, :-1]
        metric = CrossEntropyDecomposition(67, bootstrap=200)
        metric.update(logits, data.labels[:, 1:], torch.arange(len(data.ids)))  # row i: dataset row i
        want = metric.compute()
        for key in LOGGED:
            assert metrics[f"eval_{key}"] == pytest.approx(float(want[key]), rel=1e-4, abs=1e-6), key
        saved = load_state(tmp_path / str(batch_eval_metrics) / "out" / "arrays" / "eval" / "step_0.npz")
        np.testing.assert_array_equal(saved["bootstrap_counts"], metric.bootstrap_state()["bootstrap_counts"])


@pytest.mark.parametrize("value", ["1", "-3", "true", "2.5"])
def test_eval_bootstrap_config_refuses_what_is_not_0_or_at_least_2_replicates(value):
    from ce_dynamics.runs.config import ConfigError, load_config

    assert load_config([]).eval.bootstrap == 200 and load_config(["eval.bootstrap=0"]).eval.bootstrap == 0
    with pytest.raises(ConfigError, match="eval.bootstrap.*0 \\(off\\) or an integer >= 2"):
        load_config([f"eval.bootstrap={value}"])
