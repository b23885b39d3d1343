"""The documentation: the site builds in strict mode (a broken link or reference fails), every ```python block
of the pages and the README runs (each page's blocks in order, in one namespace, offline), the README stays a
front page, and the FAQ's network/GPU table says what the experiment configs say."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted(p.relative_to(ROOT).as_posix() for p in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def python_blocks(text: str) -> list[str]:
    """The ```python fences of a Markdown page, in order (```py fences are illustrations and are not run)."""
    return PYTHON_BLOCK.findall(text)


def test_python_blocks_are_found_and_py_blocks_are_not():
    text = "```python\na = 1\n```\n\n```py\nnot run\n```\n```bash\nls\n```\n```python\nb = a + 1\n```\n"
    assert python_blocks(text) == ["a = 1\n", "b = a + 1\n"]


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks((ROOT / p).read_text(encoding="utf-8"))])
def test_page_code_runs(page: str, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # what a snippet writes (figures) lands here
    monkeypatch.setenv("WANDB_MODE", "offline")
    namespace: dict = {"__name__": f"docs:{page}"}
    for i, block in enumerate(python_blocks((ROOT / page).read_text(encoding="utf-8"))):
        exec(compile(block, f"{page} (python block {i + 1})", "exec"), namespace)  # noqa: S102 - our own docs


def test_site_builds_in_strict_mode(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    if not mkdocs.is_file():
        pytest.fail("mkdocs is not installed: pip install -e '.[docs]' (part of [dev])")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "rank_log_score_sum" in api and "CEDecompositionCallback" in api  # generated from the docstrings
    assert "fonts.googleapis" not in (tmp_path / "site" / "index.html").read_text(encoding="utf-8")


def test_readme_is_a_front_page_linking_into_the_docs():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    assert "<!--" not in text and not re.search(r"\bissue \d+|#\d{2,}", text)  # no owner notes, no history
    links = re.findall(r"\]\((docs/[^)#]+)", text)
    assert links, "the README links into the docs"
    for link in links:
        assert (ROOT / link).is_file(), link
    assert "make run" in text and "make test" in text


@pytest.mark.parametrize("page", PAGES)
def test_user_docs_carry_no_development_history(page: str):
    text = (ROOT / page).read_text(encoding="utf-8")
    for pattern in (r"<!--", r"\bissues? #?\d+", r"previous commit", r"before this (branch|change|version)"):
        assert not re.search(pattern, text, re.I), (page, pattern)


def _faq_rows() -> dict[str, list[str]]:
    text = (ROOT / "docs" / "faq.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\w+)` \| (.*) \|$", text, re.M)
    return {name: [c.strip() for c in rest.split(" | ")] for name, rest in rows}


def test_faq_network_and_gpu_table_matches_the_configs():
    from ce_dynamics.runs.config import available_experiments, load_config

    rows = _faq_rows()
    assert sorted(rows) == available_experiments()  # every experiment, and only those
    for name, (mode, network, gpu) in rows.items():
        cfg = load_config([f"experiment={name}"])
        hub = cfg.mode == "replay" or cfg.model.hub_id is not None or cfg.model.tokenizer is not None
        pinned = any(cfg.data.eval[s].source == "hf" for s in cfg.data.eval_sets)
        assert mode == cfg.mode, name
        assert network.split(":")[0] == ("yes" if hub or pinned else "no"), name
        expected_gpu = {"cpu": "no", "gpu": "yes"}.get(cfg.trainer.accelerator, "recommended")
        assert gpu.split(":")[0] == expected_gpu, name
