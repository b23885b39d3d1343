"""A local Hugging Face hub cache holding a tiny, really trained GPT-NeoX at several revisions.

Replay and analysis tests load checkpoints the way users do, `from_pretrained(hub_id, revision="stepN")`,
with `HF_HUB_OFFLINE=1`. This module builds the cache those calls read, laid out like the real one::

    <root>/models--ORG--NAME/
        blobs/<sha>                         file contents (git sha1 for small files, sha256 for weights)
        snapshots/<40-hex commit>/<file>    relative symlinks into blobs/
        refs/stepN                          the commit hash, no trailing newline (one branch per step)
        refs/main                           the last step's commit

The model (hidden 32, 2 layers) is trained with AdamW on the standard library's Python code for a few
optimizer steps, and saved at the requested steps; the byte-level BPE tokenizer is trained on
`pydoc_data.topics` plus that code. The logit width is padded past the tokenizer's size to a multiple of
64, as Pythia pads 50277 tokens to 50304.

Use as pytest fixtures (`from hub_cache import tiny_hub, tiny_hub_env`): `tiny_hub` (session) builds it
once; `tiny_hub_env` also points `HF_HUB_CACHE` at it and sets `HF_HUB_OFFLINE=1` for one test.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DEFAULT_HUB_ID = "ce-dynamics-test/tiny-neox"
DEFAULT_STEPS = (0, 2, 4)
_SPECIAL_TOKENS = ("<|endoftext|>", "<|padding|>")  # ids 0 and 1, as in Pythia's tokenizer
_LFS_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class HubCache:
    """Where the cache lives and what it holds."""

    root: Path
    hub_id: str
    commits: dict[int, str]  # training step -> commit hash (refs/step<N>)
    tokenizer_size: int
    vocab_size: int  # logit width of the model (padded)
    losses: list[float] = field(default_factory=list)  # training loss before each optimizer step

    @property
    def steps(self) -> list[int]:
        return sorted(self.commits)

    @property
    def repo_dir(self) -> Path:
        return self.root / repo_folder_name(self.hub_id)

    def snapshot_dir(self, step: int) -> Path:
        return self.repo_dir / "snapshots" / self.commits[step]

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that must load from this cache only."""
        return {"HF_HUB_CACHE": str(self.root), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def repo_folder_name(hub_id: str) -> str:
    """`ORG/NAME` -> `models--ORG--NAME`, the hub cache's folder naming."""
    return "models--" + hub_id.replace("/", "--")


def _training_text() -> tuple[str, list[str]]:
    """Prose (pydoc topics) for the tokenizer, and code documents (stdlib files) for training."""
    import pydoc_data.topics

    prose = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    stdlib = Path(os.__file__).parent
    names = ["functools.py", "textwrap.py", "string/__init__.py", "bisect.py", "heapq.py", "shlex.py"]
    code = [(stdlib / n).read_text(encoding="utf-8") for n in names if (stdlib / n).is_file()]
    if not code:
        raise RuntimeError(f"no standard-library source files found under {stdlib}")
    return prose, code


def _train_tokenizer(texts: Sequence[str], vocab_size: int):
    """Byte-level BPE with Pythia's special tokens, wrapped as a `GPTNeoXTokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return GPTNeoXTokenizer(vocab=model["vocab"], merges=merges)


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _write_snapshot(repo_dir: Path, files: dict[str, bytes]) -> str:
    """Store `files` as blobs plus a snapshot of symlinks; return the (content-derived) commit hash."""
    blob_ids = {}
    for name, data in sorted(files.items()):
        lfs = name.endswith(_LFS_SUFFIXES)
        blob_ids[name] = hashlib.sha256(data).hexdigest() if lfs else _git_blob_sha1(data)
    commit = hashlib.sha1(json.dumps(blob_ids, sort_keys=True).encode()).hexdigest()
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo_dir / "blobs" / blob_ids[name]
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / name
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blob, link.parent))
    return commit


def _write_ref(repo_dir: Path, name: str, commit: str) -> None:
    ref = repo_dir / "refs" / name
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)  # no trailing newline: huggingface_hub reads the whole file as the hash


def _saved_files(save: callable) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def build_hub_cache(
    root: str | os.PathLike,
    hub_id: str = DEFAULT_HUB_ID,
    steps: Sequence[int] = DEFAULT_STEPS,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    tokenizer_size: int = 300,
    vocab_size: int | None = None,
    seq_len: int = 64,
    batch_size: int = 8,
    lr: float = 1e-2,
    seed: int = 0,
) -> HubCache:
    """Train a tiny GPT-NeoX for `max(steps)` AdamW steps and store it in a hub cache under `root`.

    The checkpoint after N optimizer steps is the branch `stepN` (step0 is the initialization).
    `vocab_size` is the logit width (default: the tokenizer's size rounded up to a multiple of 64).
    """
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    steps = sorted({int(s) for s in steps})
    if not steps or steps[0] < 0:
        raise ValueError(f"steps must be non-negative training steps, got {steps}")
    if "/" not in hub_id:
        raise ValueError(f"hub_id must look like 'ORG/NAME', got {hub_id!r}")
    root = Path(root)
    repo_dir = root / repo_folder_name(hub_id)
    if repo_dir.exists():
        shutil.rmtree(repo_dir)

    prose, code = _training_text()
    tokenizer = _train_tokenizer([prose, *code], tokenizer_size)
    tokenizer_files = _saved_files(tokenizer.save_pretrained)
    vocab_size = vocab_size or -(-len(tokenizer) // 64) * 64
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=2048,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPTNeoXForCausalLM(config)
    ids = torch.tensor(tokenizer("\n".join(code))["input_ids"])
    n_windows = ids.numel() // seq_len
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)

    commits: dict[int, str] = {}
    losses: list[float] = []
    for step in range(steps[-1] + 1):
        if step in steps:
            model.eval()
            files = _saved_files(lambda d: model.save_pretrained(d, safe_serialization=True))
            commits[step] = _write_snapshot(repo_dir, {**files, **tokenizer_files})
            _write_ref(repo_dir, f"step{step}", commits[step])
        if step == steps[-1]:
            break
        model.train()
        batch = windows[torch.randint(0, n_windows, (batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    _write_ref(repo_dir, "main", commits[steps[-1]])
    return HubCache(root, hub_id, commits, len(tokenizer), vocab_size, losses)


@contextlib.contextmanager
def offline_hub(root: str | os.PathLike) -> Iterator[None]:
    """Point huggingface_hub at `root`, offline, in this process (env vars and the constants read at import)."""
    import huggingface_hub.constants as hf_constants

    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"HF_HUB_CACHE": str(root), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}.items():
            mp.setenv(key, value)
        mp.setattr(hf_constants, "HF_HUB_CACHE", str(root))
        mp.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="session")
def tiny_hub(tmp_path_factory: pytest.TempPathFactory) -> HubCache:
    """A hub cache with `ce-dynamics-test/tiny-neox` at step0, step2, step4 (built once per session)."""
    return build_hub_cache(tmp_path_factory.mktemp("hub_cache"))


@pytest.fixture()
def tiny_hub_env(tiny_hub: HubCache) -> Iterator[HubCache]:
    """`tiny_hub`, with HF_HUB_CACHE pointing at it and HF_HUB_OFFLINE=1 for the duration of one test."""
    with offline_hub(tiny_hub.root):
        yield tiny_hub


if __name__ == "__main__":  # build a cache by hand: python tests/hub_cache.py DIR
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "hub_cache")
    cache = build_hub_cache(target)
    print(f"{cache.hub_id} at {cache.repo_dir}: steps {cache.steps}, losses {[round(x, 3) for x in cache.losses]}")
    print(f"use: HF_HUB_OFFLINE=1 HF_HUB_CACHE={target.resolve()}")
