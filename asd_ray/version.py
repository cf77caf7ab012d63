"""asd-ray's version: the installed package's (``importlib.metadata``), and the git commit of the checkout the code
was imported from, when it was imported from one (an editable install, or a run from the repository)."""

from __future__ import annotations

import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def package_version() -> str:
    """The version of the installed ``asd-ray`` distribution, or ``unknown`` when it is not installed."""
    try:
        return version("asd-ray")
    except PackageNotFoundError:
        return "unknown"


def commit() -> str | None:
    """The abbreviated commit of the checkout holding this code, ``-dirty`` when tracked files differ from it;
    None outside a git checkout (an installed wheel) or without git."""
    if not (CHECKOUT / ".git").exists():  # a directory, or a file in a git worktree
        return None
    try:
        done = subprocess.run(["git", "-C", str(CHECKOUT), "describe", "--always", "--dirty", "--abbrev=12",
                               "--exclude=*"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def version_line() -> str:
    """``asd-ray 0.1.0 (commit 1a2b3c4d5e6f)``, or without the commit outside a checkout."""
    c = commit()
    return f"asd-ray {package_version()}" + (f" (commit {c})" if c else "")
