"""The install line: the README's CPU command takes torch from PyTorch's CPU wheel index (as
PyTorch's own install selector does), CI installs exactly as the README says, and what got
installed is a CPU build of torch (a plain ``pip install torch`` resolves to a multi-GB CUDA build)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _readme_cpu_block() -> list[str]:
    """The shell lines of the README's first bash block under the 'Install' heading."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Install", 1)
    assert len(section) == 2, "the README has no '## Install' section"
    block = re.search(r"```bash\n(.*?)```", section[1], re.S)
    assert block, "the README's Install section has no bash block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def _pip_installs(lines: list[str]) -> list[str]:
    """Every ``pip install ...`` command in ``lines`` (split at &&), normalised to ``pip install ARGS``."""
    out = []
    for line in lines:
        for part in line.split("&&"):
            m = re.search(r"(?:python3? -m )?pip3? install (.*)", part.strip())
            if m:
                args = [a for a in m.group(1).split() if a != "-q"]
                out.append("pip install " + " ".join(args))
    return out


def test_readme_cpu_install_names_pytorch_cpu_index() -> None:
    installs = _pip_installs(_readme_cpu_block())
    torch_lines = [c for c in installs if re.search(r"\btorch\b", c)]
    assert torch_lines, f"no pip install of torch in the README's CPU block: {installs}"
    assert all(f"--index-url {CPU_INDEX}" in c for c in torch_lines), torch_lines
    assert any('-e ".[all]"' in c for c in installs), installs


def test_ci_installs_exactly_as_the_readme_says() -> None:
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    ci = _pip_installs([line for line in ci_lines if not line.lstrip().startswith("#")])
    readme = _pip_installs(_readme_cpu_block())
    # .ci/run upgrades pip first; after that its installs are the README's CPU block, in order
    ci = [c for c in ci if "--upgrade pip" not in c]
    assert ci[:len(readme)] == readme, f".ci/run installs {ci}, the README says {readme}"


def test_installed_torch_is_the_cpu_build() -> None:
    # CI installs the CPU build (the README's line); a CUDA build here means the line pulled the wrong wheel
    assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA {torch.version.cuda} build"
