"""Hub revisions for replay: which `stepN` branches a model has, the commit each resolved to, whether two
revisions hold the same weights, and freeing a revision's downloaded files once it is evaluated.

Pythia-style repositories keep one branch per saved training step (`step0` ... `step143000`); some of them are
known to hold identical weights (pythia issue #205), which a walk should say instead of plotting a flat line.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

_STEP = re.compile(r"step(\d+)")


def _cache_root() -> Path:
    import huggingface_hub.constants as hf

    return Path(hf.HF_HUB_CACHE)


def repo_cache_dir(hub_id: str) -> Path:
    """`<HF_HUB_CACHE>/models--ORG--NAME`."""
    return _cache_root() / ("models--" + hub_id.replace("/", "--"))


def step_revisions(hub_id: str) -> list[tuple[str, int]]:
    """Every `stepN` branch of `hub_id`, in step order: listed by the hub, or offline (`HF_HUB_OFFLINE=1`) the
    refs the local cache holds. ValueError when there are none."""
    import huggingface_hub.constants as hf

    if hf.HF_HUB_OFFLINE:
        refs = repo_cache_dir(hub_id) / "refs"
        names = [p.name for p in refs.iterdir()] if refs.is_dir() else []
        where = f"the local cache {refs} (offline)"
    else:
        from huggingface_hub import HfApi

        names = [branch.name for branch in HfApi().list_repo_refs(hub_id).branches]
        where = f"the hub's branches of {hub_id}"
    steps = sorted((int(m.group(1)), name) for name in names if (m := _STEP.fullmatch(name)))
    if not steps:
        raise ValueError(f"replay.revisions=all: no stepN revisions in {where}; give replay.revisions=[0,1000,...]")
    return [(name, step) for step, name in steps]


def resolved_commit(hub_id: str, revision: str) -> str | None:
    """The commit hash `revision` of `hub_id` resolved to, read from the cache after loading (None if unknown)."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(hub_id, "config.json", revision=revision)
    if isinstance(path, str):
        return Path(path).parent.name  # .../snapshots/<commit>/config.json
    return None


def step_of_commit(hub_id: str, commit: str | None) -> int | None:
    """The training step N whose `stepN` branch points at `commit` (the smallest, if several), or None: listed by
    the hub, or offline (or when the hub cannot be asked) from the refs the local cache holds."""
    import huggingface_hub.constants as hf

    if commit is None:
        return None
    targets: dict[str, str] = {}
    if not hf.HF_HUB_OFFLINE:
        try:
            from huggingface_hub import HfApi

            targets = {b.name: b.target_commit for b in HfApi().list_repo_refs(hub_id).branches}
        except Exception:  # noqa: BLE001 - no network or no such repo: fall back to the cache's refs
            targets = {}
    refs = repo_cache_dir(hub_id) / "refs"
    if not targets and refs.is_dir():
        targets = {p.name: p.read_text().strip() for p in refs.iterdir() if p.is_file()}
    steps = [int(m.group(1)) for name, target in targets.items() if target == commit and (m := _STEP.fullmatch(name))]
    return min(steps) if steps else None


def weights_digest(model: Any) -> str:
    """sha256 over the names and bytes of every parameter and buffer of a torch module: equal digests mean
    identical weights, whatever files or commits they came from."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def delete_revision_files(hub_id: str, commit: str) -> int:
    """Delete the cached snapshot of `commit` and the blobs no other cached revision uses; bytes freed."""
    from huggingface_hub import scan_cache_dir

    cache = scan_cache_dir(_cache_root())
    strategy = cache.delete_revisions(commit)
    freed = strategy.expected_freed_size
    strategy.execute()
    return int(freed)
