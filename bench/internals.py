"""Count the lines of app/ and workers/ that touch RQ's internals (issue 13 part 5).

    python bench/internals.py [REV ...]     # default: the working tree

Prints one JSON line per tree: ``{"rev", "lines", "by_module"}``. A line counts when it is a
code line (not blank, not a comment, not a docstring) and either

- lies in the body of a method that overrides or copies an RQ function pinned by the canary
  (the leaf names of ``workers.rq_overrides.UPSTREAM``), in a class derived from an RQ class,
  or
- names a private or undocumented RQ attribute (``workers.rq_overrides.PRIVATE``, plus
  ``_shutdown_requested_date`` that an older tree read) outside such a body.

The same rule runs on every tree given, so "before" and "after" are comparable.
"""

from __future__ import annotations

import ast
import io
import json
import os
import subprocess
import sys
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Run as a script, sys.path[0] is bench/, whose other benchmarks (http.py) shadow the
# stdlib. Imported (tests import bench.<name>), sys.path[0] is somebody else's: left alone.
if __name__ == "__main__":
    sys.path[0] = ROOT

from workers.rq_overrides import PRIVATE, UPSTREAM  # noqa: E402

OVERRIDDEN = {name.rsplit(".", 1)[1] for name in UPSTREAM}
PRIVATE_NAMES = {attr for _, attr in PRIVATE} | {"_shutdown_requested_date"}
RQ_MODULES = ("rq",)


def _files(rev: str | None) -> dict[str, str]:
    if rev is None:
        out = {}
        for top in ("app", "workers"):
            for dirpath, _, names in os.walk(os.path.join(ROOT, top)):
                for name in names:
                    if name.endswith(".py"):
                        path = os.path.join(dirpath, name)
                        with open(path, encoding="utf-8") as fh:
                            out[os.path.relpath(path, ROOT)] = fh.read()
        return out
    listing = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", rev, "app", "workers"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return {
        path: subprocess.run(
            ["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        for path in listing
        if path.endswith(".py")
    }


def _code_lines(source: str) -> set[int]:
    """Line numbers holding code: no blank lines, comments or docstrings."""
    tree = ast.parse(source)
    doc = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                doc.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT):
            continue
        if tok.type in (tokenize.DEDENT, tokenize.ENDMARKER):
            continue
        lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines - doc


def _rq_names(tree: ast.Module) -> set[str]:
    """Names bound by ``from rq... import X`` (the RQ classes a class may derive from)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in RQ_MODULES:
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def count(source: str) -> int:
    tree = ast.parse(source)
    code = _code_lines(source)
    rq_bases = _rq_names(tree)
    # Classes derived (directly or through a class of this module) from an RQ class.
    derived: set[str] = set()
    changed = True
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    while changed:
        changed = False
        for cls in classes:
            bases = {b.id for b in cls.bases if isinstance(b, ast.Name)}
            if cls.name not in derived and bases & (rq_bases | derived):
                derived.add(cls.name)
                changed = True
    touched: set[int] = set()
    for cls in classes:
        if cls.name not in derived:
            continue
        for item in cls.body:
            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                if item.name in OVERRIDDEN:
                    touched.update(range(item.lineno, item.end_lineno + 1))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in PRIVATE_NAMES
            and not (isinstance(node.value, ast.Name) and node.value.id == "rq_overrides")
        ):  # rq_overrides.retries_left(job) is our helper, not RQ's attribute
            touched.update(range(node.lineno, node.end_lineno + 1))
    return len(touched & code)


def main(argv: list[str]) -> int:
    for rev in argv or [None]:
        by_module = {}
        for path, source in sorted(_files(rev).items()):
            n = count(source)
            if n:
                by_module[path] = n
        print(
            json.dumps(
                {
                    "rev": rev or "working tree",
                    "lines": sum(by_module.values()),
                    "by_module": by_module,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
