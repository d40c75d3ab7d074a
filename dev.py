#!/usr/bin/env python3
"""Bootstrap for a fresh clone, needing only Python 3.11+.

    python3 dev.py up     create .venv, install, start the whole service (API on :8086)
    python3 dev.py test   create .venv, install with test extras, run the whole test suite

Extra arguments after ``test`` go to pytest; after ``up`` to ``gpu-orchestrator up``.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"


def _install(extras: str) -> None:
    """Create the venv and install the project, skipping work when nothing changed."""
    if sys.version_info < (3, 11):
        sys.exit(f"dev.py: Python 3.11+ is required, this is {sys.version.split()[0]}")
    if not PY.exists():
        print("dev.py: creating .venv", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp_src = (ROOT / "setup.cfg").read_bytes() + (ROOT / "pyproject.toml").read_bytes()
    stamp = hashlib.sha256(stamp_src + extras.encode()).hexdigest()
    stamp_file = VENV / f".installed-{extras or 'base'}"
    if stamp_file.exists() and stamp_file.read_text() == stamp:
        return
    print(f"dev.py: installing gpu-orchestrator{f'[{extras}]' if extras else ''}", flush=True)
    target = f".[{extras}]" if extras else "."
    subprocess.check_call([str(PY), "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    subprocess.check_call([str(PY), "-m", "pip", "install", "--quiet", "-e", target], cwd=ROOT)
    stamp_file.write_text(stamp)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("up", "test"):
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "up":
        _install("")
        exe = BIN / "gpu-orchestrator"
        os.execv(str(exe), [str(exe), "up", *rest])
    _install("test")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.call([str(PY), "-m", "pytest", *rest], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
