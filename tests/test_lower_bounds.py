"""tools/lower_bounds.py: the pins `make test-oldest` installs are exactly pyproject's lower bounds."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "lower_bounds.py"


def run(pyproject: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(pyproject)], capture_output=True, text=True)


def test_every_runtime_dependency_is_pinned_at_its_lower_bound():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    result = run(ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stderr
    pins = result.stdout.split()
    assert len(pins) == len(declared)
    assert "torch==2.11.0" in pins and "jsonargparse==4.51" in pins  # extras dropped, version kept as written


def test_a_dependency_without_a_lower_bound_is_refused_in_one_line(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["torch>=2.9.1", "torchvision"]\n')
    result = run(pyproject)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert f"{pyproject}: dependency 'torchvision' has no single '>=' lower bound" in result.stderr
