"""CEDecompositionEval in a real transformers.Trainer with a tiny GPT-NeoX: both batch_eval_metrics modes against
the metric (and F.cross_entropy) on the same logits, dict eval sets, npz arrays, W&B histograms offline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("accelerate")
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Trainer, TrainingArguments  # noqa: E402

from ce_dynamics.functional import KEYS  # noqa: E402
from ce_dynamics.integrations.transformers import CEDecompositionEval, CEDecompositionTrainerCallback  # noqa: E402
from ce_dynamics.metric import CrossEntropyDecomposition  # noqa: E402

V, T = 67, 12


class Sequences(torch.utils.data.Dataset):
    def __init__(self, seed: int, n: int, pad_from: int | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, V, (n, T), generator=g)
        self.labels = self.ids.clone()
        if pad_from is not None:  # right padding, as a collator marks it
            self.labels[::2, pad_from:] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


@pytest.fixture(scope="module")
def model() -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=64)
    return GPTNeoXForCausalLM(config).eval()


def expected(model: GPTNeoXForCausalLM, data: Sequences) -> tuple[dict[str, float], float, CrossEntropyDecomposition]:
    """The metric and F.cross_entropy on the model's own logits of the whole set (shifted by one)."""
    with torch.no_grad():
        logits = model(input_ids=data.ids).logits[:, :-1]
    labels = data.labels[:, 1:]
    metric = CrossEntropyDecomposition(V)
    metric.update(logits, labels)
    out = metric.compute()
    ce = float(F.cross_entropy(logits.reshape(-1, V).double(), labels.reshape(-1), ignore_index=-100))
    return {**{k: float(out[k]) for k in KEYS}, "num_tokens": int(out["num_tokens"])}, ce, metric


def make_trainer(model, tmp_path, eval_dataset, batch_eval_metrics: bool, report_to=(), batch_size: int = 4):
    evaluator = CEDecompositionEval(vocab_size=V)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_eval_batch_size=batch_size,
                             report_to=list(report_to), batch_eval_metrics=batch_eval_metrics, use_cpu=True,
                             dataloader_num_workers=0)
    callback = CEDecompositionTrainerCallback(evaluator)
    trainer = Trainer(model=model, args=args, eval_dataset=eval_dataset,
                      preprocess_logits_for_metrics=evaluator.preprocess_logits_for_metrics,
                      compute_metrics=evaluator.compute_metrics, callbacks=[callback])
    return trainer, evaluator


@pytest.mark.parametrize("batch_eval_metrics", [False, True])
def test_evaluate_matches_the_metric_and_eval_loss(model, tmp_path, batch_eval_metrics):
    data = Sequences(1, 10)  # 10 = 4 + 4 + 2: a short last batch
    trainer, _ = make_trainer(model, tmp_path, data, batch_eval_metrics)
    metrics = trainer.evaluate()
    want, ce, _ = expected(model, data)
    for key in KEYS:
        assert metrics[f"eval_{key}"] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert metrics["eval_num_tokens"] == want["num_tokens"] == 10 * (T - 1)
    assert metrics["eval_cross_entropy"] == pytest.approx(ce, rel=1e-5)
    # unpadded data: the Trainer's own loss (mean over equal-length sequences) is the same number
    assert metrics["eval_cross_entropy"] == pytest.approx(metrics["eval_loss"], rel=1e-5)
    assert metrics["eval_cross_entropy"] == pytest.approx(
        metrics["eval_error_entropy"] + metrics["eval_self_alignment"] - metrics["eval_confidence"], abs=1e-9)


@pytest.mark.parametrize("batch_eval_metrics", [False, True])
def test_dict_eval_sets_padding_and_arrays(model, tmp_path, batch_eval_metrics):
    sets = {"code": Sequences(2, 7), "prose": Sequences(3, 9, pad_from=5)}
    trainer, _ = make_trainer(model, tmp_path, sets, batch_eval_metrics, batch_size=3)
    metrics = trainer.evaluate()
    for name, data in sets.items():
        want, ce, metric = expected(model, data)
        for key in KEYS:
            assert metrics[f"eval_{name}_{key}"] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (name, key)
        assert metrics[f"eval_{name}_num_tokens"] == want["num_tokens"]
        assert metrics[f"eval_{name}_cross_entropy"] == pytest.approx(ce, rel=1e-5)
        saved = np.load(tmp_path / "out" / "arrays" / name / "step_0.npz")
        np.testing.assert_array_equal(saved["rank_counts"], metric.rank_counts.numpy())
        np.testing.assert_allclose(saved["rank_log_score_sum"], metric.rank_log_score_sum.numpy(), rtol=1e-6)
    assert sets["prose"].labels.eq(-100).any()  # the padded set really skipped positions
    assert metrics["eval_prose_num_tokens"] < 9 * (T - 1)


def test_preprocess_keeps_two_numbers_per_token_and_refuses_wrong_width(model):
    evaluator = CEDecompositionEval(vocab_size=V)
    logits = torch.randn(3, T, V)
    labels = torch.randint(0, V, (3, T))
    labels[0, 4] = -100
    out = evaluator.preprocess_logits_for_metrics(logits, labels)
    assert out.shape == (3, T - 1, 2)
    assert out[0, 3, 0] == -1  # label at t=4 is predicted at t=3: skipped
    target = labels[1, 6]
    assert out[1, 5, 0] == int((logits[1, 5] > logits[1, 5, target]).sum())
    assert out[1, 5, 1] == pytest.approx(float(torch.log_softmax(logits[1, 5].double(), 0)[target]), abs=1e-5)
    with pytest.raises(ValueError, match=r"\[\.\.\., 67\]"):
        evaluator.preprocess_logits_for_metrics(torch.randn(2, T, V + 1), labels[:2])
    with pytest.raises(ValueError, match="preprocess_logits_for_metrics"):
        evaluator.compute_metrics(type("P", (), {"predictions": np.zeros((2, T, V))})())


def test_wandb_gets_log_rank_histograms_and_image(model, tmp_path, monkeypatch):
    import json
    import subprocess
    import sys
    from pathlib import Path

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "ce-dynamics-test")
    trainer, _ = make_trainer(model, tmp_path, {"code": Sequences(4, 6)}, False, report_to=["wandb"])
    trainer.evaluate()
    import wandb

    run_dir = Path(wandb.run.dir).parent
    wandb.finish()
    wandb_cli = Path(sys.executable).with_name("wandb")
    proc = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(run_dir)], capture_output=True,
                          text=True, check=True, timeout=60)
    rows = [json.loads(line)["history"]["item"] for line in proc.stdout.splitlines()
            if line.strip() and json.loads(line).get("type") == "history"]
    media = [r for r in rows if "decomp/code/p_e._type" in r]
    assert len(media) == 1
    row = media[0]
    assert row["decomp/code/p_e_vs_q_e._type"] == "image-file"
    assert row["decomp/code/p_e.bins"][0] == 0
    assert row["decomp/code/p_e.bins"][1] == pytest.approx(math.log10(2))
    assert row["decomp/code/p_e.bins"][-1] == pytest.approx(math.log10(V + 1))
    assert any("eval/code_cross_entropy" in r for r in rows)  # the Trainer's own W&B callback logged the scalars


_TWO_PROCESSES = r'''
import json, sys
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Trainer, TrainingArguments
from ce_dynamics.integrations.transformers import CEDecompositionEval
V, T = %d, %d
torch.manual_seed(0)
model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=64)).eval()
ids = torch.randint(0, V, (10, T), generator=torch.Generator().manual_seed(1))
data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(10)]
for batch_mode in (False, True):
    ev = CEDecompositionEval(V)
    args = TrainingArguments(output_dir=sys.argv[1], per_device_eval_batch_size=2, report_to=[], use_cpu=True,
                             batch_eval_metrics=batch_mode, ddp_backend="gloo")
    trainer = Trainer(model=model, args=args, eval_dataset=data, compute_metrics=ev.compute_metrics,
                      preprocess_logits_for_metrics=ev.preprocess_logits_for_metrics)
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        print("METRICS", json.dumps({"world": trainer.args.world_size, "batch": batch_mode, **metrics}))
if torch.distributed.is_initialized():  # tear gloo down before exit (its threads at exit can abort the process)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
'''


@pytest.mark.slow
def test_two_processes_under_torchrun_give_the_single_process_numbers(model, tmp_path):
    """accelerate under torchrun, 2 CPU processes on gloo, 10 sequences in batches of 2 (ranks get 3 and 2
    batches): the Trainer gathers the per-token values, every token is counted once."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "two.py"
    script.write_text(_TWO_PROCESSES % (V, T))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", str(script), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line[len("METRICS "):]) for line in proc.stdout.splitlines() if line.startswith("METRICS ")]
    assert [(r["world"], r["batch"]) for r in results] == [(2, False), (2, True)]
    data = Sequences(1, 10)  # the same sequences and model weights as the script's
    want, ce, _ = expected(model, data)
    for metrics in results:
        assert metrics["eval_num_tokens"] == want["num_tokens"] == 10 * (T - 1)
        for key in KEYS:
            assert metrics[f"eval_{key}"] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


_KILLABLE_TRAINING = r'''
import os, signal, sys
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Trainer, TrainingArguments
import ce_dynamics.files as files
from ce_dynamics.integrations.transformers import CEDecompositionEval, CEDecompositionTrainerCallback
out, kill_step, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
if kill_step >= 0:  # SIGKILL right after that step's state file is written (before W&B sees the step)
    real = files.save_state
    def save_then_die(root, name, step, state):
        real(root, name, step, state)
        if step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
    files.save_state = save_then_die
V, T = %d, %d
torch.manual_seed(0)
model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=64))
g = torch.Generator().manual_seed(1)
ids = torch.randint(0, V, (40, T), generator=g)
train = [{"input_ids": ids[i], "labels": ids[i]} for i in range(32)]
evals = {"code": [{"input_ids": ids[i], "labels": ids[i]} for i in range(32, 40)]}
evaluator = CEDecompositionEval(vocab_size=V)
args = TrainingArguments(output_dir=out, max_steps=8, eval_strategy="steps", eval_steps=2, save_steps=4,
                         logging_steps=1, per_device_train_batch_size=4, per_device_eval_batch_size=4,
                         learning_rate=1e-2, report_to=["wandb"], use_cpu=True, dataloader_num_workers=0,
                         seed=3, disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evals,
                  preprocess_logits_for_metrics=evaluator.preprocess_logits_for_metrics,
                  compute_metrics=evaluator.compute_metrics, callbacks=[CEDecompositionTrainerCallback(evaluator)])
trainer.train(resume_from_checkpoint=True if resume else None)
''' % (V, T)


@pytest.mark.slow
def test_sigkill_after_an_evals_arrays_then_resume_records_each_step_once_in_one_wandb_run(tmp_path):
    """A real Trainer.train() SIGKILLed right after step 6's npz (before W&B has it; last checkpoint at step 4),
    then `train(resume_from_checkpoint=True)`: one W&B run id, each eval step once in W&B, W&B equal to the npz,
    and step 6's npz (the first evaluation) not overwritten by the resumed run's re-evaluation."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "out"
    # Without WANDB_SERVICE: a W&B service this test process started would outlive the killed child and keep its
    # run "in use" (a user's killed process takes its own service with it).
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_PROJECT": "ce-dynamics-test",
           "WANDB_SILENT": "true", "PYTHONWARNINGS": "default"}

    def train(kill_step: int, resume: bool) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _KILLABLE_TRAINING, str(out), str(kill_step), str(int(resume))],
                              capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)

    killed = train(6, False)
    assert killed.returncode == -9, killed.stderr[-3000:]  # (each step once, below)
    step6 = out / "arrays" / "code" / "step_6.npz"
    first_record = step6.read_bytes()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    resumed = train(-1, True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert step6.read_bytes() == first_record  # the first evaluation stays the record
    print("step 6 re-evaluated with other numbers:", "code at step 6 was evaluated again" in resumed.stderr)

    run_dirs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2 and len({d.name.rsplit("-", 1)[1] for d in run_dirs}) == 1, run_dirs  # one run
    wandb_cli = Path(sys.executable).with_name("wandb")
    rows = []
    for run_dir in run_dirs:
        proc = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(run_dir)], capture_output=True,
                              text=True, check=True, timeout=60)
        rows += [json.loads(line)["history"]["item"] for line in proc.stdout.splitlines()
                 if line.strip() and json.loads(line).get("type") == "history"]
    decomp = [r for r in rows if "decomp/code/cross_entropy" in r]
    assert sorted(r["train/global_step"] for r in decomp) == [2, 4, 6, 8], (run_dirs, resumed.stderr[-3000:])
    evals = [r["train/global_step"] for r in rows if "eval/code_cross_entropy" in r]
    assert len(evals) == len(set(evals))  # never two values of the Trainer's own eval numbers for one step
    for row in decomp:
        with np.load(out / "arrays" / "code" / f"step_{row['train/global_step']}.npz") as state:
            ce = -state["rank_log_score_sum"].sum() / state["rank_counts"].sum()  # numpy, not the package
        assert row["decomp/code/cross_entropy"] == pytest.approx(ce, rel=1e-12)
        if "eval/code_cross_entropy" in row:
            assert row["eval/code_cross_entropy"] == pytest.approx(ce, rel=1e-12)
    assert sorted(p.name for p in (out / "arrays" / "code").iterdir()) == [f"step_{s}.npz" for s in (2, 4, 6, 8)]


def test_a_reevaluated_step_keeps_the_first_record_and_wandb_gets_it_from_the_npz(model, tmp_path, monkeypatch):
    """Step 0 evaluated without W&B, then again with other weights and W&B: the npz is not overwritten (a warning
    names the step and both values), and W&B gets step 0 once, back-filled from the npz."""
    import copy
    import json
    import subprocess
    import sys
    from pathlib import Path

    data = {"code": Sequences(5, 6)}
    trainer, _ = make_trainer(model, tmp_path, data, False)
    first = trainer.evaluate()["eval_code_cross_entropy"]
    path = tmp_path / "out" / "arrays" / "code" / "step_0.npz"
    saved = path.read_bytes()
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.get_output_embeddings().weight.mul_(3.0)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "ce-dynamics-test")
    trainer, _ = make_trainer(other, tmp_path, data, False, report_to=["wandb"])
    with pytest.warns(RuntimeWarning, match=r"code at step 0 was evaluated again .* differs from the record"):
        second = trainer.evaluate()["eval_code_cross_entropy"]
    assert abs(second - first) > 1e-3 and path.read_bytes() == saved
    import wandb

    run_dir = Path(wandb.run.dir).parent
    wandb.finish()
    assert (tmp_path / "out" / "wandb_run_id").read_text() == run_dir.name.rsplit("-", 1)[1]
    proc = subprocess.run([str(Path(sys.executable).with_name("wandb")), "leet", "inspect", "--json", str(run_dir)],
                          capture_output=True, text=True, check=True, timeout=60)
    rows = [json.loads(line)["history"]["item"] for line in proc.stdout.splitlines()
            if line.strip() and json.loads(line).get("type") == "history"]
    decomp = [r for r in rows if "decomp/code/cross_entropy" in r]
    assert [r["train/global_step"] for r in decomp] == [0]
    assert decomp[0]["decomp/code/cross_entropy"] == pytest.approx(first, rel=1e-12)
    assert not any("eval/code_cross_entropy" in r for r in rows)  # the refused evaluation's numbers: nowhere
