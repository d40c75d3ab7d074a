#!/usr/bin/env python3
"""Bootstrap for a fresh clone, needing only Python 3.11+.

    python3 dev.py up     create .venv, install, start the whole service (API on :8086)
    python3 dev.py test   create .venv, install with test extras, run the whole test suite
    python3 dev.py lock   re-resolve the newest versions setup.cfg allows into constraints.txt

Extra arguments after ``test`` go to pytest; after ``up`` to ``gpu-orchestrator up``.
``up`` and ``test`` install the exact versions in constraints.txt (setup.cfg keeps ranges for
people who ``pip install`` the package), so a new release upstream changes nothing here until
``lock`` is run and its result committed.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
PIP = BIN / ("pip.exe" if os.name == "nt" else "pip")
CONSTRAINTS = ROOT / "constraints.txt"
#: Extras that `lock` resolves: together they name every package `up` and `test` install.
LOCK_EXTRAS = "embedded,test"
#: setuptools warns on every editable install of a flat layout ("Editable installation.": folders
#: in the working directory could shadow the package). Running from the checkout is the point of
#: dev.py, so that one warning is silenced; any other still shows.
EDITABLE_WARNING_FILTER = "ignore:Editable installation"


def install_env() -> dict:
    """The environment for pip: ours plus the filter above, keeping any PYTHONWARNINGS set."""
    current = os.environ.get("PYTHONWARNINGS")
    return dict(
        os.environ, PYTHONWARNINGS=",".join(filter(None, [current, EDITABLE_WARNING_FILTER]))
    )


def _install(extras: str) -> None:
    """Create the venv and install the project, skipping work when nothing changed."""
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py is what tells an older Python so
        sys.exit(f"dev.py: Python 3.11+ is required, this is {sys.version.split()[0]}")
    if not PY.exists() or not PIP.exists():  # no pip: a creation that failed half-way
        _create_venv()
    stamp_src = b"".join(
        p.read_bytes() for p in (ROOT / "setup.cfg", ROOT / "pyproject.toml", CONSTRAINTS)
    )
    stamp = hashlib.sha256(stamp_src + extras.encode()).hexdigest()
    stamp_file = VENV / f".installed-{extras or 'base'}"
    if stamp_file.exists() and stamp_file.read_text() == stamp:
        return
    print(f"dev.py: installing gpu-orchestrator{f'[{extras}]' if extras else ''}", flush=True)
    target = f".[{extras}]" if extras else "."
    subprocess.check_call([str(PY), "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    subprocess.check_call(
        [str(PY), "-m", "pip", "install", "--quiet", "-c", str(CONSTRAINTS), "-e", target],
        cwd=ROOT,
        env=install_env(),
    )
    stamp_file.write_text(stamp)


def _create_venv() -> None:
    print("dev.py: creating .venv", flush=True)
    try:
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    except subprocess.CalledProcessError:  # ensurepip, which Debian and Ubuntu ship apart
        sys.exit(
            "dev.py: could not install pip into .venv (ensurepip failed); on Debian or Ubuntu "
            "run 'apt-get install python3-venv', then this command again"
        )


def _lock() -> int:
    """Resolve setup.cfg's ranges afresh in a scratch venv and pin the result."""
    with tempfile.TemporaryDirectory(prefix="gpuo-lock-") as tmp:
        venv.EnvBuilder(with_pip=True).create(tmp)
        py = str(Path(tmp) / ("Scripts" if os.name == "nt" else "bin") / "python")
        subprocess.check_call([py, "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
        subprocess.check_call(
            [py, "-m", "pip", "install", "--quiet", f".[{LOCK_EXTRAS}]"], cwd=ROOT
        )
        frozen = subprocess.check_output(
            [
                py,
                "-m",
                "pip",
                "freeze",
                "--all",
                "--exclude",
                "pip",
                "--exclude",
                "gpu-orchestrator",
            ],
            text=True,
        )
    pins = sorted((line for line in frozen.splitlines() if "==" in line), key=str.lower)
    CONSTRAINTS.write_text(
        "# Exact versions that `python3 dev.py up|test` and CI install (pip -c); setup.cfg keeps\n"
        "# the ranges. Regenerate with `python3 dev.py lock` and commit the result.\n"
        f"# Resolved on Python {sys.version_info.major}.{sys.version_info.minor}, "
        f"{sys.platform}.\n" + "\n".join(pins) + "\n"
    )
    print(f"dev.py: wrote {len(pins)} pins to {CONSTRAINTS.name}")
    return 0


def main(argv: list[str]) -> int:
    try:
        return _main(argv)
    except subprocess.CalledProcessError as exc:  # pip said why, above
        print(f"dev.py: {shlex.join(map(str, exc.cmd))} failed (exit {exc.returncode})")
        return 1


def _main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("up", "test", "lock"):
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "lock":
        return _lock()
    if command == "up":
        _install("embedded")
        exe = BIN / "gpu-orchestrator"
        os.execv(str(exe), [str(exe), "up", *rest])
    _install("test")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.call([str(PY), "-m", "pytest", *rest], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
