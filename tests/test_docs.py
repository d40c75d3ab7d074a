"""README.md and docs/*.md against the code: the names a reader types or greps for (config keys,
metric names, error codes, CLI commands and flags, HTTP routes) must exist, so a rename fails
here instead of misleading a user. Elsewhere: the config reference (config/config.yaml.example)
in tests/test_settings.py, the compose file in tests/test_compose.py, the worked scheduling
examples in tests/test_scheduling_docs.py.

docs/benchmarks.md is left out on purpose: it is a dated log of measurements and may name
what a past round measured."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from app import cli, errors, http_errors, http_worker, replication, run, schemas
from app import settings as settings_mod
from app.settings import SPEC, Opt
from app.timefmt import parse_duration
from tests.api_support import app, clock, make_app  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md"] + sorted(
    p for p in (ROOT / "docs").glob("*.md") if p.name != "benchmarks.md"
)
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def _code(text: str) -> list[str]:
    """The lines of fenced code blocks and the inline code spans of a Markdown text."""
    spans = [line for block in _FENCE.findall(text) for line in block.splitlines()]
    return spans + re.findall(r"`([^`\n]+)`", _FENCE.sub("", text))


def _where(path: Path, what: str) -> str:
    return f"{path.relative_to(ROOT)}: {what}"


def _section(path: Path, start: str, end: str) -> str:
    text = path.read_text()
    return text[text.index(start) : text.index(end)]


# ----------------------------------------------------------------------------- config keys


def _resolves(dotted: str, node: object = SPEC) -> bool:
    """Whether a documented key names a setting: sections, then an option (what follows an
    option is inside its value: tenants.quotas.<name>.max_gpus); ``*`` and ``<...>`` stand for
    any one name."""
    part, _, rest = dotted.partition(".")
    if isinstance(node, Opt):
        return True
    if not isinstance(node, dict):
        return False
    if part == "*" or part.startswith("<"):
        children = list(node.values())
    else:
        children = [node[part]] if part in node else []
    return any(_resolves(rest, child) if rest else True for child in children)


def _documented_keys():
    for path in DOCS:
        for span in _code(path.read_text()):
            for token in re.findall(r"(?<![\w./-])([a-z_]+\.[a-z_<*][\w<>*.-]*)", span):
                token = token.rstrip(".")
                section, _, rest = token.partition(".")
                if section not in SPEC:
                    continue
                # a file or a module, not a key: redis.log, workers.scheduler.reap, ...
                if re.search(r"\.(py|md|lua|json|log|ya?ml)$", token) or (
                    (ROOT / section / f"{rest.split('.')[0]}.py").exists()
                ):
                    continue
                yield path, token


def test_every_config_key_the_docs_name_exists():
    keys = list(_documented_keys())
    assert len(keys) > 100, "the scan found too few keys: is it still reading the docs?"
    unknown = sorted({_where(path, key) for path, key in keys if not _resolves(key)})
    assert not unknown, f"config keys the docs name that app/settings.py lacks: {unknown}"


def test_the_key_check_tells_a_renamed_key():
    assert _resolves("scheduler.max_ttl") and _resolves("tenants.quotas.team-a.max_gpus")
    assert _resolves("workload_defaults.<type>.default_gpus") and _resolves("tenants.*.max_queued")
    assert not _resolves("scheduler.max_ttl_seconds") and not _resolves("workload_defaults.x.y")


# --------------------------------------------------------------------------------- metrics

_METRIC = r"(?:gpu_orchestrator|gpu_scheduler|gpu_allocator)_[a-z_]*[a-z]"


def _declared_metrics() -> set[str]:
    """Every metric family name the code declares (a Counter's may lack its ``_total``)."""
    names = set()
    for path in [*(ROOT / "app").rglob("*.py"), *(ROOT / "workers").rglob("*.py")]:
        names.update(re.findall(rf"[\"']({_METRIC})[\"']", path.read_text()))
    return names


def _exported(name: str, declared: set[str]) -> bool:
    return name in declared or (name.endswith("_total") and name[: -len("_total")] in declared)


def test_every_metric_the_docs_name_is_declared():
    declared = _declared_metrics()
    named = {(path, n) for path in DOCS for n in re.findall(rf"\b{_METRIC}\b", path.read_text())}
    assert len(named) > 15
    unknown = sorted(_where(path, n) for path, n in named if not _exported(n, declared))
    assert not unknown, f"metrics the docs name that the code does not declare: {unknown}"


def test_api_md_names_every_metric():
    """docs/api.md, Metrics, is where an operator looks a name up: every family is there
    (the per-GPU gauges may be written ``..._gpu_memory_used_mb``)."""
    text = _section(ROOT / "docs" / "api.md", "## Metrics", "## Serving")
    missing = sorted(
        name
        for name in _declared_metrics()
        if not re.search(rf"\b{name}(_total)?\b", text)
        and "..." + name.removeprefix("gpu_orchestrator") not in text
    )
    assert not missing, f"docs/api.md, Metrics, does not name: {missing}"


# ----------------------------------------------------------------------------- error codes


def _domain_errors() -> list[type[errors.OrchestratorError]]:
    def below(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from below(sub)

    assert replication.NotAcknowledged.code == "not_replicated"  # imported: a subclass
    return [errors.OrchestratorError, *below(errors.OrchestratorError)]


def test_the_error_table_of_api_md_is_what_the_api_answers():
    table = _section(ROOT / "docs" / "api.md", "## Errors", "## Limits")
    rows = [(int(s), c) for s, c in re.findall(r"^\| (\d{3}) \| `([a-z_]+)` \|", table, re.M)]
    assert len(rows) > 10
    domain = {cls.code: cls.status for cls in _domain_errors()}
    http = set(http_errors.HTTP_CODES.items())
    http |= {(status, code) for status, (code, _) in http_worker._CODES.items()}
    wrong = [(s, c) for s, c in rows if domain.get(c) != s and (s, c) not in http]
    assert not wrong, f"docs/api.md error rows the API never answers: {wrong}"
    missing = sorted(set(domain) - {c for _, c in rows})
    assert not missing, f"error codes the API answers that docs/api.md's table lacks: {missing}"


# ------------------------------------------------------------------------------------ CLI


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def _check_command_line(words: list[str]) -> str | None:
    """What in ``gpu-orchestrator WORDS`` the CLI does not know, or None. Words after the
    last command level that are not flags are arguments (NODE, FILE, ...)."""
    parser = cli._parser()
    flags = _flags(parser)
    globals_ = set(flags)
    for word in words:
        if word == "--":
            return None
        if word.startswith("-"):
            flag = word.split("=")[0]
            if re.fullmatch(r"--?[a-z][a-z-]*", flag) and flag not in flags:
                return flag
            continue
        commands = _commands(parser) if parser is not None else {}
        if parser is not None and parser.prog == "gpu-orchestrator" and word == "run":
            parser, flags = None, _flags(run.parser()) | globals_
        elif commands and word in commands:
            parser = commands[word]
            flags = _flags(parser) | globals_
        elif commands and re.fullmatch(r"[a-z]+", word):
            return word
        else:
            parser = None  # an argument: the command line is known from here on
    return None


def test_every_command_and_flag_the_docs_show_exists():
    shown = [
        (path, m.split())
        for path in DOCS
        for span in _code(path.read_text())
        for m in re.findall(r"gpu-orchestrator((?: +[^\s`|#]+)*)", span)
        if not span.startswith("gpu-orchestrator is up")  # up's banner, not a command
    ]
    assert len(shown) > 20, "the scan found too few commands: is it still reading the docs?"
    bad = sorted(
        {
            _where(p, f"{' '.join(w)} ({_check_command_line(w)})")
            for p, w in shown
            if _check_command_line(w)
        }
    )
    assert not bad, f"commands or flags the docs show that the CLI does not have: {bad}"


def test_the_command_check_tells_a_wrong_name():
    assert _check_command_line(["admin", "drain", "n1", "--wait", "--timeout", "300"]) is None
    assert _check_command_line(["run", "--gpus", "2", "--", "python", "--weird"]) is None
    assert _check_command_line(["admin", "evict", "n1"]) == "evict"
    assert _check_command_line(["monitor", "--onse"]) == "--onse"
    assert _check_command_line(["run", "--gpu", "2"]) == "--gpu"


# ----------------------------------------------------------------------------- HTTP routes


def _endpoints_table() -> set[tuple[str, str]]:
    """(method, route) of each row of docs/api.md's Endpoints table; ``POST /a/<x>/cordon``,
    ``/uncordon`` in one cell is two routes. Route variables compare as ``<>``."""
    table = _section(ROOT / "docs" / "api.md", "## Endpoints", "`/gpu/status` reads")
    out = set()
    for cell in re.findall(r"^\| (.+?) \|", table, re.M):
        last = None
        for method, path in re.findall(r"`(?:(GET|POST|DELETE) )?(/[^`\s]*)`", cell):
            if method:
                last = (method, path)
            elif last:
                last = (last[0], last[1].rsplit("/", 1)[0] + path)
            else:
                continue
            out.add((last[0], re.sub(r"<[^>]+>", "<>", last[1])))
    return out


def test_the_endpoints_of_api_md_are_the_routes_the_api_serves(app):
    served = {
        (method, re.sub(r"<[^>]+>", "<>", rule.rule))
        for rule in app.url_map.iter_rules()
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    listed = _endpoints_table()
    assert ("POST", "/admin/nodes/<>/uncordon") in listed and len(listed) > 20
    assert not listed - served, f"docs/api.md lists routes the API lacks: {listed - served}"
    api = {(m, r) for m, r in served if r.startswith(("/gpu/", "/admin/"))}
    assert not api - listed, f"API routes docs/api.md's Endpoints table lacks: {api - listed}"


# ------------------------------------------------------------------ files and tests named


def test_every_file_and_test_the_docs_name_exists():
    """``app/lua/reap.lua``, ``bench/chaos.py``, ``tests/test_worker.py::test_...``: a reader
    opens them, so each must be there (a renamed test leaves its claim unbacked)."""
    named = {
        (path, m.rstrip(".,:;)"))
        for path in DOCS
        for m in re.findall(
            r"\b(?:app|workers|deploy|bench|tests|config)/[\w./-]+(?:::\w+)?", path.read_text()
        )
    }
    assert len(named) > 50
    missing = []
    for path, name in sorted(named):
        file, _, test = name.partition("::")
        if not (ROOT / file).exists():
            missing.append(_where(path, name))
        elif test and not re.search(
            rf"^\s*(?:def|class) {test}\b", (ROOT / file).read_text(), re.M
        ):
            missing.append(_where(path, name))
    assert not missing, f"files or tests the docs name that do not exist: {missing}"


def test_every_benchmark_flag_the_docs_show_exists():
    """``bench/chaos.py --duration 20 --seed 11``: each flag is one the script declares."""
    shown = {
        (path, script, flag)
        for path in DOCS
        for script, args in re.findall(r"\b(bench/\w+\.py)((?: +[^\s`|]+)*)", path.read_text())
        for flag in re.findall(r"(?<!\S)(--[a-z][a-z-]*)", args)
    }
    assert len(shown) > 5
    unknown = sorted(
        _where(path, f"{script} {flag}")
        for path, script, flag in shown
        if f'"{flag}"' not in (ROOT / script).read_text()
    )
    assert not unknown, f"benchmark flags the docs show that the script lacks: {unknown}"


def test_api_md_documents_every_field_of_the_allocate_body():
    """docs/api.md's ``POST /gpu/allocate`` table is the body the API accepts (an unknown field
    is a 422, so a field missing here is one a user cannot find)."""
    table = _section(ROOT / "docs" / "api.md", "### `POST /gpu/allocate`", "Unknown top-level")
    documented = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    accepted = set(schemas.AllocateRequestSchema().fields)
    assert documented == accepted, (
        f"only in docs/api.md: {documented - accepted}; only in the API: {accepted - documented}"
    )


def test_every_yaml_config_the_docs_show_loads(tmp_path):
    """A reader copies these into config.yaml: each ```yaml block is a valid config on its own
    (what ``gpu-orchestrator config check`` says of it)."""
    blocks = [
        (path, block)
        for path in DOCS
        for block in re.findall(r"^```ya?ml\n(.*?)^```", path.read_text(), re.S | re.M)
    ]
    assert len(blocks) > 10
    bad = []
    for i, (path, block) in enumerate(blocks):
        file = tmp_path / f"block{i}.yaml"
        file.write_text(block)
        try:
            settings_mod.load(str(file), environ={})
        except settings_mod.ConfigError as exc:
            bad.append(_where(path, str(exc).replace(str(file), "<block>")))
    assert not bad, f"config examples in the docs that do not load: {bad}"


def test_every_upper_case_name_the_docs_show_is_in_the_code():
    """Environment variables (``GPU_ORCH_API_KEY``, ``PROMETHEUS_MULTIPROC_DIR``) and constants
    (``MAX_LEASE_SECONDS``, ``REC_DEFAULTS``) the docs name in code: each is still spelled so
    somewhere in the code, the compose files or CI."""
    sources = [
        *(ROOT / "app").rglob("*.py"),
        *(ROOT / "app").rglob("*.lua"),
        *(ROOT / "workers").rglob("*.py"),
        *(ROOT / "bench").rglob("*.py"),
        *(ROOT / "tests").rglob("*.py"),
        *(ROOT / "deploy").rglob("*.*"),
        ROOT / "dev.py",
        ROOT / "docker-compose.yml",
        ROOT / "Dockerfile",
        ROOT / ".ci" / "run",
    ]
    this = Path(__file__).resolve()  # its docstrings name some: they do not count
    code = "\n".join(
        p.read_text(errors="replace") for p in sources if p.is_file() and p.resolve() != this
    )
    named = {
        (path, name)
        for path in DOCS
        for span in _code(path.read_text())
        for name in re.findall(r"\b([A-Z][A-Z0-9]*_[A-Z0-9_]*[A-Z0-9])\b", span)
    }
    assert len(named) > 30
    unknown = sorted(_where(p, n) for p, n in named if not re.search(rf"\b{n}\b", code))
    assert not unknown, f"upper-case names the docs show that the code does not have: {unknown}"


def test_the_signature_check_of_workers_md_accepts_what_the_workers_send():
    """docs/workers.md, "Verifying the signature": receivers copy this function; it must
    accept a webhook the workers signed, and refuse another secret and an old timestamp."""
    from workers.webhooks import sign

    text = (ROOT / "docs" / "workers.md").read_text()
    [snippet] = re.findall(r"```python\n(.*?def verify\(.*?)```", text, re.S)
    namespace: dict = {}
    exec(snippet, namespace)  # noqa: S102 - our own documentation's example
    verify = namespace["verify"]
    now = str(int(time.time()))
    body = b'{"status": "allocated", "request_id": "svc-1-00000001"}'
    headers = {"X-GPU-Orchestrator-Timestamp": now}
    headers["X-GPU-Orchestrator-Signature"] = sign("s3cret", now, body)
    assert verify("s3cret", headers, body)
    assert not verify("another", headers, body)
    assert not verify("s3cret", headers, body + b" ")
    old = str(int(time.time()) - 3600)
    stale = {
        "X-GPU-Orchestrator-Timestamp": old,
        "X-GPU-Orchestrator-Signature": sign("s3cret", old, body),
    }
    assert not verify("s3cret", stale, body)


def test_the_analyzer_example_of_workload_md_runs():
    """docs/workload.md, "For code that calls it", with the default settings and a fleet of
    8 x 81559 MB: it gives the figures that page quotes for llama-3-70b."""

    class Fleet:
        def fleet_limits(self):
            return {"max_gpus_per_node": 8, "max_gpu_memory_mb": 81559, "gpus_total": 8}

    text = (ROOT / "docs" / "workload.md").read_text()
    [snippet] = re.findall(
        r"```python\n(from app.workload import WorkloadAnalyzer.*?)```", text, re.S
    )
    namespace: dict = {"settings": settings_mod.defaults(), "engine": Fleet()}
    exec(snippet, namespace)  # noqa: S102 - our own documentation's example
    result = namespace["result"]
    assert (result["required_gpus"], result["min_memory_mb"]) == (2, 80109)
    assert "2 GPUs of 80109 MB" in text


def _option(dotted: str) -> Opt | None:
    node: object = SPEC
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, Opt) else None


_UNITS = {"ms": 0.001, "s": 1, "min": 60, "m": 60, "h": 3600, "KiB": 1024, "MiB": 1024 * 1024}


def _stated(text: str) -> object:
    """A default as the docs write it (``64 KiB``, ``10,000``, ``5 s``, ``true``, ``[]``), as
    a number, a bool or ``"empty"``; None when it is prose (``¼ of max_queue_size``)."""
    t = text.strip().strip("`").replace(",", "").strip()
    if t in ("true", "false"):
        return t == "true"
    if t in ("[]", '""', "''", "{}"):
        return "empty"
    m = re.fullmatch(r"(\d+(?:\.\d+)?) ?(ms|s|min|m|h|KiB|MiB)?", t)
    return float(m.group(1)) * _UNITS.get(m.group(2), 1) if m else None


def _actual(opt: Opt) -> object:
    value = opt.default
    if isinstance(value, bool):
        return value
    if value in ([], "", {}):
        return "empty"
    if isinstance(value, str):
        return float(parse_duration(value))
    return float(value) if isinstance(value, int | float) else None


def test_every_default_the_docs_state_is_the_default():
    """``| `server.idle_timeout` | `60s` |`` tables and "`key` (default X)": the value stated is
    the built-in one."""
    stated = []
    for path in DOCS:
        text = path.read_text()
        rows = re.findall(r"^\| `([a-z_.]+)`(?: \(env `\w+`\))? \| ([^|]+) \|", text, re.M)
        inline = re.findall(
            r"`([a-z_]+\.[a-z_.]+)`[^`\n]{0,20}?\(?default:? `?([^`),;]+)`?[),;]", text
        )
        for key, value in rows + inline:
            opt = _option(key)
            if opt is not None and _stated(value) is not None and _actual(opt) is not None:
                stated.append((path, key, value, _stated(value), _actual(opt)))
    assert len(stated) > 30
    wrong = [_where(p, f"{k}: {v} (the default is {a})") for p, k, v, s, a in stated if s != a]
    assert not wrong, f"defaults the docs state that app/settings.py does not have: {wrong}"
