"""update_from_hidden / token_ranks_and_log_scores_from_hidden: the state of `update(hidden @ weight.T + bias)`
without the logits; its memory bound measured in a subprocess (VmHWM); the callback's hidden-states path in a
short Lightning fit of CausalLMModule."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ce_dynamics import CEDecompositionCallback, CrossEntropyDecomposition
from ce_dynamics.functional import KEYS, token_ranks_and_log_scores, token_ranks_and_log_scores_from_hidden
from ce_dynamics.runs.module import CausalLMModule

REPO = Path(__file__).resolve().parent.parent
IGNORE = -100


def _integer_case(dtype: torch.dtype, bias: bool, vocab: int = 97, width: int = 16, seed: int = 0):
    """Small-integer hidden states and weights: every logit is an integer below 256 in magnitude, exact in bf16,
    so any product order gives the same logits (many ties, also with the target's logit)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randint(-2, 3, (3, 5, width), generator=gen).to(dtype)
    weight = torch.randint(-2, 3, (vocab, width), generator=gen).to(dtype)
    b = torch.randint(-3, 4, (vocab,), generator=gen).to(dtype) if bias else None
    target = torch.randint(0, vocab, (3, 5), generator=gen)
    target[1, ::2] = IGNORE
    return hidden, weight, b, target


def _numpy_ranks_log_scores(logits: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    t = target.reshape(-1)
    z, t = z[t != IGNORE], t[t != IGNORE]
    z_t = z[np.arange(len(t)), t]
    peak = z.max(1)
    return (z > z_t[:, None]).sum(1), z_t - peak - np.log(np.exp(z - peak[:, None]).sum(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
def test_exact_logits_give_numpy_ranks_and_log_scores(dtype, bias):
    hidden, weight, b, target = _integer_case(dtype, bias)
    logits = hidden.double().numpy() @ weight.double().numpy().T + (b.double().numpy() if bias else 0.0)
    expected_ranks, expected_scores = _numpy_ranks_log_scores(logits, target.numpy())
    # transposed hidden (not viewable as rows), 4-token blocks over 2 threads: several blocks per worker
    strided = hidden.transpose(0, 1).contiguous().transpose(0, 1)
    ranks, scores = token_ranks_and_log_scores_from_hidden(strided, weight, target, b, ignore_index=IGNORE,
                                                           num_threads=2, block_rows=4)
    np.testing.assert_array_equal(ranks.numpy(), expected_ranks)
    np.testing.assert_allclose(scores.numpy(), expected_scores, rtol=1e-12 if dtype == torch.float64 else 1e-6,
                               atol=1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dtype,score_tol,max_flips", [(torch.float32, 1e-5, 0.02), (torch.bfloat16, 2e-2, 0.05)])
def test_update_from_hidden_matches_update_on_the_product_at_50k(dtype, score_tol, max_flips):
    vocab, width = 50304, 64
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 40, width, generator=gen).to(dtype)
    weight = (torch.randn(vocab, width, generator=gen) / width**0.5).to(dtype)
    bias = (torch.randn(vocab, generator=gen) * 0.1).to(dtype)
    target = torch.randint(0, vocab, (4, 40), generator=gen)
    target[:, :3] = IGNORE
    from_hidden = CrossEntropyDecomposition(vocab)
    from_hidden.update_from_hidden(hidden, weight, target, bias)
    reference = CrossEntropyDecomposition(vocab)
    reference.update(hidden @ weight.T + bias, target)
    tokens = int((target != IGNORE).sum())
    assert int(from_hidden.rank_counts.sum()) == tokens == int(reference.rank_counts.sum())
    # matmul rounding may move a near-tie's rank by a step; the rank distributions stay equal up to that
    moved = (from_hidden.rank_counts - reference.rank_counts).abs().sum().item() / 2
    assert moved <= max_flips * tokens
    a, b = from_hidden.compute(), reference.compute()
    assert float(a["cross_entropy"]) == pytest.approx(float(b["cross_entropy"]), rel=score_tol)
    # per token: the same ranks and log-scores as the scalar path on the product (fp32: no flips expected)
    ranks, scores = token_ranks_and_log_scores_from_hidden(hidden, weight, target, bias)
    ref_ranks, ref_scores = token_ranks_and_log_scores(hidden @ weight.T + bias, target)
    assert (ranks != ref_ranks).float().mean().item() <= max_flips
    np.testing.assert_allclose(scores.numpy(), ref_scores.numpy(), atol=score_tol * 20, rtol=score_tol)


def test_bad_inputs_name_what_was_expected():
    hidden, weight, bias, target = _integer_case(torch.float32, True)
    with pytest.raises(ValueError, match=r"`weight` of shape \[V, H\] = \[V, 16\]"):
        token_ranks_and_log_scores_from_hidden(hidden, weight[:, :8], target)
    with pytest.raises(ValueError, match="dtype and device of `hidden`"):
        token_ranks_and_log_scores_from_hidden(hidden, weight.double(), target)
    with pytest.raises(ValueError, match=r"`bias` of shape \[V\] = \[97\]"):
        token_ranks_and_log_scores_from_hidden(hidden, weight, target, bias[:5])
    with pytest.raises(ValueError, match=r"hidden.shape\[:-1\] == target.shape"):
        token_ranks_and_log_scores_from_hidden(hidden, weight, target[:, :2])
    with pytest.raises(ValueError, match=r"target values in \[0, 97\).*got 97 at position \(2, 4\)"):
        bad = target.clone()
        bad[2, 4] = 97
        token_ranks_and_log_scores_from_hidden(hidden, weight, bad)
    with pytest.raises(TypeError, match="integer tensor"):
        token_ranks_and_log_scores_from_hidden(hidden, weight, target.float())
    with pytest.raises(ValueError, match=r"`weight` of shape \[50, H\] \(vocab_size rows\)"):
        CrossEntropyDecomposition(50).update_from_hidden(hidden, weight, target)
    with pytest.raises(ValueError, match="non-finite log-score"):
        nan_hidden = hidden.clone()
        nan_hidden[0, 0, 0] = float("nan")
        token_ranks_and_log_scores_from_hidden(nan_hidden, weight, target)


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from ce_dynamics.functional import token_ranks_and_log_scores_from_hidden
    tokens, width, vocab, threads = (int(a) for a in sys.argv[1:5])
    block_rows = None if sys.argv[5] == "auto" else int(sys.argv[5])
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, width, generator=gen)
    weight = torch.randn(vocab, width, generator=gen) / width ** 0.5
    target = torch.randint(0, vocab, (tokens,), generator=gen)
    token_ranks_and_log_scores_from_hidden(hidden[:64], weight, target[:64])  # warm up torch's allocations

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as handle:  # reset the peak (VmHWM) to the current RSS
        handle.write("5")
    before = status("VmRSS:")
    token_ranks_and_log_scores_from_hidden(hidden, weight, target, block_rows=block_rows)
    print(json.dumps({"extra": status("VmHWM:") - before, "logits": tokens * vocab * 4}))
""")


def _extra_peak_memory(block_rows: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, "4096", "16", "50304", "1", block_rows],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (VmHWM reset)")
def test_extra_peak_memory_is_a_block_not_the_logits():
    measured = _extra_peak_memory("auto")
    assert measured["extra"] <= 0.10 * measured["logits"], measured  # 4096 x 50304 fp32 logits: 824 MB


# ------------------------------------------------------------------------------------------ callback

SHAPE = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=64)


def _fit_results(tmp: Path, validation_output: str, **callback_kwargs) -> dict:
    torch.manual_seed(0)
    module = CausalLMModule(model_config=SHAPE, validation_output=validation_output)
    callback = CEDecompositionCallback(output_dir=tmp, dataset_names=["val"], log_histograms=False,
                                       save_arrays=False, **callback_kwargs)
    gen = torch.Generator().manual_seed(3)
    train = [{"input_ids": torch.randint(0, 300, (4, 17), generator=gen)} for _ in range(3)]
    val = [{"input_ids": torch.randint(0, 300, (4, 17), generator=gen)} for _ in range(2)]
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[callback], default_root_dir=tmp,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        max_steps=3, val_check_interval=3, num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(train, batch_size=None), DataLoader(val, batch_size=None))
    return {"decomp": callback.last_results["val"], "loss": float(trainer.callback_metrics["val/loss/val_0"])}


def test_callback_scores_hidden_states_like_logits_in_a_fit(tmp_path):
    logits = _fit_results(tmp_path / "logits", "logits")
    hidden = _fit_results(tmp_path / "hidden", "hidden_states")  # lm_head from model.get_output_embeddings()
    named = _fit_results(tmp_path / "named", "hidden_states", lm_head="model.lm_head")
    called = _fit_results(tmp_path / "called", "hidden_states", lm_head=lambda module: module.model.lm_head.weight)
    assert logits["decomp"]["num_tokens"] == 2 * 4 * 16
    for other in (hidden, named, called):
        assert other["decomp"]["num_tokens"] == logits["decomp"]["num_tokens"]
        assert other["loss"] == pytest.approx(logits["loss"], rel=1e-6)  # the blockwise validation loss
        for key in KEYS:
            assert other["decomp"][key] == pytest.approx(logits["decomp"][key], rel=1e-5, abs=1e-5), key
    assert hidden["decomp"]["cross_entropy"] == pytest.approx(logits["loss"], rel=1e-5)


def test_callback_without_an_unembedding_says_to_pass_lm_head(tmp_path):
    module = CausalLMModule(model_config=SHAPE, validation_output="hidden_states")
    callback = CEDecompositionCallback(output_dir=tmp_path, dataset_names=["val"], lm_head="model.nope")
    val = [{"input_ids": torch.randint(0, 300, (4, 17), generator=torch.Generator().manual_seed(3))}]
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[callback], default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="lm_head='model.nope'.*has no attribute 'nope'"):
        trainer.validate(module, DataLoader(val, batch_size=None), verbose=False)  # in fit: a warning (issue 9)
    with pytest.raises(ValueError, match="lm_head must be None, an attribute name or a callable"):
        CEDecompositionCallback(lm_head=3)


def test_update_from_hidden_accumulates_and_refreshes_compute():
    hidden, weight, bias, target = _integer_case(torch.float32, True)
    metric = CrossEntropyDecomposition(97)
    metric.update_from_hidden(hidden, weight, target, bias)
    first = int(metric.compute()["num_tokens"])
    metric.update_from_hidden(hidden[:1], weight, target[:1], bias)
    assert first == int((target != IGNORE).sum())
    assert int(metric.compute()["num_tokens"]) == first + int((target[:1] != IGNORE).sum())  # not the cached value
    assert metric.update_count == 2
