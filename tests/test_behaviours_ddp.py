"""DDP (2 gloo processes on CPU) where rank 1 gets no batch of one validation dataloader: both ranks still
join that metric's sync, and the logged numbers are numpy's over every rank's tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from numpy_reference import decompose

from ce_dynamics.functional import KEYS

REPO = Path(__file__).resolve().parent.parent
V = 23

SCRIPT = textwrap.dedent('''
    import json, sys
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from ce_dynamics import CEDecompositionCallback

    V = 23
    DATA = torch.load(sys.argv[2])

    class Bigram(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.table = torch.nn.Embedding(V, V)
            self.allow_zero_length_dataloader_with_multiple_devices = True  # Lightning refuses it otherwise

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            (x,) = batch
            return {"logits": self.table(x[:, :-1]), "labels": x[:, 1:]}

        def val_dataloader(self):
            rank = self.trainer.global_rank
            alpha = DATA["alpha"][rank::2]  # half each
            beta = DATA["beta"] if rank == 0 else DATA["beta"][:0]  # rank 1: not one batch
            return [DataLoader(TensorDataset(alpha), batch_size=2), DataLoader(TensorDataset(beta), batch_size=2)]

    if __name__ == "__main__":
        callback = CEDecompositionCallback(output_dir=sys.argv[1], dataset_names=["alpha", "beta"])
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", use_distributed_sampler=False,
                            callbacks=[callback], logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, default_root_dir=sys.argv[1])
        trainer.validate(Bigram(), verbose=False)
        with open(f"{sys.argv[1]}/results_rank{trainer.global_rank}.json", "w") as fh:
            json.dump(callback.last_results, fh)
''')


@pytest.mark.slow
def test_a_rank_without_a_batch_of_one_dataloader_still_syncs_it(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    data = {"alpha": torch.randint(0, V, (8, 9), generator=g), "beta": torch.randint(0, V, (3, 9), generator=g)}
    torch.save(data, tmp_path / "data.pt")
    (tmp_path / "script.py").write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(tmp_path / "script.py"), str(tmp_path), str(tmp_path / "data.pt")],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]

    torch.manual_seed(0)
    table = torch.nn.Embedding(V, V)
    results = [json.loads((tmp_path / f"results_rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0] == results[1]  # every rank holds the synced numbers
    for name, x in data.items():
        with torch.no_grad():
            expected = decompose(table(x[:, :-1]).numpy(), x[:, 1:].numpy())
        got = results[0][name]
        assert got["num_tokens"] == expected["num_tokens"] == x[:, 1:].numel()
        for key in KEYS:
            assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-7), (name, key)
    assert sorted(p.name for p in (tmp_path / "arrays").iterdir()) == ["alpha", "beta"]
