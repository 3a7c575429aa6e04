"""Shared fixtures of the Python tests: the repository's test pools and the CLI binary
whose output the package must reproduce."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture(scope="session")
def cli() -> Path:
    """The `regmean-gpu` binary (REGMEAN_GPU_BIN, else the release build of this checkout)."""
    path = Path(os.environ.get("REGMEAN_GPU_BIN", ROOT / "target" / "release" / "regmean-gpu"))
    if not path.is_file():
        pytest.fail(f"{path} not found: run `cargo build --release` first (or set REGMEAN_GPU_BIN)")
    return path


def run_cli(cli: Path, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(cli), *map(str, args)], capture_output=True, text=True, cwd=cwd)


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli_error(result: subprocess.CompletedProcess) -> str:
    """The one `error:` line of a failed CLI run, without the prefix."""
    assert result.returncode == 1, result
    lines = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0].removeprefix("error: ")
