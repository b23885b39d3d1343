"""The package as pip installs it: a wheel built from this tree, installed (non-editable, `pip install
--no-deps`) into fresh venvs that see only what they are given: the core with torch, torchmetrics and numpy
alone, and the console command with every extra. No network: the wheel is built without build isolation and
the dependencies are the test interpreter's own installed files, linked into the light venv."""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
CORE = ("torch", "torchmetrics", "numpy")
SITE = Path(sysconfig.get_paths()["purelib"])


def _run(cmd: list[str], timeout: int = 120, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONPATH": ""}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


def _venv(path: Path, extra_paths: list[Path], wheel: Path) -> Path:
    """A fresh venv at `path` (no pip), `extra_paths` on its sys.path via a .pth, the wheel pip-installed."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     check=True).stdout.strip())
    (site / "deps.pth").write_text("".join(f"{p}\n" for p in extra_paths))
    proc = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet", str(wheel)])
    assert proc.returncode == 0, proc.stderr
    return python


def _link_dependencies(names: tuple[str, ...], dest: Path) -> list[str]:
    """Symlink the installed files of `names` and their (non-extra) requirements into `dest`."""
    seen: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        dist = md.distribution(name)
        for req in map(Requirement, dist.requires or []):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(req.name)
        for top in {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}:
            src, dst = SITE / top, dest / top
            if src.exists() and not top.endswith(".pth") and not dst.exists():
                dst.symlink_to(src)
    return sorted(seen)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("ce_dynamics", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out),
                 str(src)])
    assert proc.returncode == 0, proc.stderr
    (built,) = out.glob("ce_dynamics-*.whl")
    return built


LIGHT_CHECK = r"""
import sys, importlib.util
for extra in ("lightning", "wandb", "transformers", "omegaconf", "matplotlib"):
    assert importlib.util.find_spec(extra) is None, f"{extra} is visible: the venv is not light"
import torch
import ce_dynamics
from ce_dynamics import CrossEntropyDecomposition
from ce_dynamics.functional import cross_entropy_decomposition
metric = CrossEntropyDecomposition(vocab_size=3)
metric.update(torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]]), torch.tensor([0, 2]))
out = metric.compute()
print("CE", float(out["cross_entropy"]))
print("FILE", ce_dynamics.__file__)
try:
    metric.plot()
except ImportError as err:
    print("PLOT", err)
else:
    raise AssertionError("metric.plot() worked without matplotlib")
for stmt in ("import ce_dynamics.lightning.callback", "from ce_dynamics import CEDecompositionCallback",
             "import ce_dynamics.integrations.transformers", "import ce_dynamics.runs.training"):
    try:
        exec(stmt)
    except ImportError as err:
        print("ERR", stmt, "|", err)
    else:
        raise AssertionError(f"{stmt} worked without its extra")
"""


def test_light_install_gives_the_metric_and_names_the_missing_extras(wheel, tmp_path):
    deps = tmp_path / "deps"
    deps.mkdir()
    linked = _link_dependencies(CORE, deps)
    assert not {"lightning", "wandb", "transformers", "omegaconf"} & set(linked), linked
    python = _venv(tmp_path / "venv", [deps], wheel)
    proc = _run([str(python), "-c", LIGHT_CHECK], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # CE of the two tokens by hand: -log softmax([2,1,0])[0] and -log softmax([0,3,1])[2]
    import math

    want = (-(2 - math.log(math.exp(2) + math.exp(1) + 1)) - (1 - math.log(1 + math.exp(3) + math.exp(1)))) / 2
    assert float(lines[0].split()[1]) == pytest.approx(want, rel=1e-6)  # log-scores in float32
    assert str(tmp_path / "venv") in lines[1]  # the installed copy, not this checkout
    errors = [line for line in lines if line.startswith("ERR")]
    assert len(errors) == 4, proc.stdout
    for line in errors[:2]:
        assert "ce-dynamics[lightning]" in line and "'lightning' is not installed" in line, line
    assert "ce-dynamics[train]" in errors[2], errors[2]
    plot = next(line for line in lines if line.startswith("PLOT"))
    assert "'matplotlib' is not installed" in plot and "ce-dynamics[lightning]" in plot, plot
    # the console script exists and says which extra it needs; its help works without that extra
    command = str(tmp_path / "venv" / "bin" / "ce-dynamics")
    proc = _run([command, "experiments"], cwd=tmp_path)
    assert proc.returncode == 1 and "ce-dynamics[train]" in proc.stderr, proc.stderr
    for args in (["--help"], ["train", "--help"]):
        proc = _run([command, *args], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "usage: ce-dynamics" in proc.stdout and "pip install 'ce-dynamics[train]'" in proc.stdout, proc.stdout


def test_console_command_finds_the_packaged_configs(wheel, tmp_path):
    python = _venv(tmp_path / "venv", [SITE], wheel)
    command = tmp_path / "venv" / "bin" / "ce-dynamics"
    elsewhere = tmp_path / "elsewhere"  # not the repository: configs must come from the installed package
    elsewhere.mkdir()
    proc = _run([str(command), "--help"], cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    assert f"configs: {site}/ce_dynamics/configs" in proc.stdout, proc.stdout
    assert "ce-dynamics {train,replay,sweep}" in proc.stdout
    proc = _run([str(command), "experiments"], cwd=elsewhere)
    shipped = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
    assert proc.stdout.split() == shipped
    # the same key=value overrides as train.py: a misspelt key is refused with the valid ones listed
    proc = _run([str(command), "train", "trainer.max_stepz=3"], cwd=elsewhere)
    assert proc.returncode == 2 and "ce-dynamics train: config error" in proc.stderr, proc.stderr
    assert "trainer.max_stepz" in proc.stderr and "max_steps" in proc.stderr
    proc = _run([str(command), "replay", "mode=train"], cwd=elsewhere)
    assert proc.returncode == 2 and "contradicts" in proc.stderr
    # `train --help`: every key of default.yaml with its value for the experiment, meaning and accepted values
    proc = _run([str(command), "train", "experiment=tiny_scaling", "--help"], cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    keys = {line.split()[0].split("=")[0] for line in proc.stdout.split("\nkeys (", 1)[1].splitlines()[1:]}
    import yaml

    def leaves(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict) and f"{prefix}{key}" != "data.eval":
                yield from leaves(value, f"{prefix}{key}.")
            elif f"{prefix}{key}" != "data.eval":
                yield f"{prefix}{key}"

    assert set(leaves(yaml.safe_load((ROOT / "configs" / "default.yaml").read_text()))) <= keys
    assert "num_threads=1 " in proc.stdout  # tiny_scaling's own value, not default.yaml's null
    assert "ckpt_path=null" in proc.stdout and "last_or_new" in proc.stdout  # the meaning, from the yaml comment
    assert "[an integer >= -1 (-1: no limit)]" in proc.stdout  # the rule of trainer.max_steps
    proc = _run([str(command), "scaling", "--help"], cwd=elsewhere)
    assert proc.returncode == 0 and "--min-models" in proc.stdout
    proc = _run([str(command), "fly"], cwd=elsewhere)
    assert proc.returncode == 2 and "unknown command 'fly'" in proc.stderr
