"""The package's layers (README, "Layout"): the core imports no stage; a stage imports the core and
``pipeline.data``, never another stage; only the application layer (``pipeline.app``, ``pipeline.cli``,
``pipeline.demo``, ``__main__`` modules) wires stages together. Read from the source with ``ast``,
so imports inside functions count too."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "pipeline"
STAGES = {"data", "train", "eval", "sample", "publish", "classifier"}
APP = {"pipeline.app", "pipeline.cli", "pipeline.demo"}


def module_name(path: Path, pkg: Path) -> str:
    parts = path.relative_to(pkg.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if module in APP or parts[-1] == "__main__":
        return "app"
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else "core"


def imports(path: Path) -> set[str]:
    """Every pipeline module ``path`` imports (``from pipeline import x``: pipeline.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"pipeline.{a.name}" for a in node.names} if node.module == "pipeline" else {node.module}
    return {n for n in found if n.split(".")[0] == "pipeline"}


def violations(pkg: Path) -> list[str]:
    bad = []
    for path in sorted(pkg.rglob("*.py")):
        mod = module_name(path, pkg)
        here = layer(mod)
        for target in sorted(imports(path)):
            there = layer(target)
            if here == "app" or there in ("core", here, "data"):
                if here == "core" and there == "data":
                    bad.append(f"{mod} (core) imports {target} (stage data)")
                continue
            what = "the application layer" if there == "app" else f"stage {there}"
            bad.append(f"{mod} ({'core' if here == 'core' else 'stage ' + here}) imports {target} ({what})")
    return bad


def test_no_stage_imports_another_and_the_core_imports_no_stage():
    assert violations(PKG) == []


@pytest.mark.parametrize("source, expected", [
    ("from pipeline.eval.cli import evaluate_main\n", "pipeline.train.x (stage train) imports pipeline.eval.cli (stage eval)"),
    ("def f():\n    import pipeline.publish.hub\n", "pipeline.train.x (stage train) imports pipeline.publish.hub (stage publish)"),
    ("from pipeline.app import train\n", "pipeline.train.x (stage train) imports pipeline.app (the application layer)"),
])
def test_a_stage_importing_another_is_caught(tmp_path, source, expected):
    (tmp_path / "pipeline" / "train").mkdir(parents=True)
    (tmp_path / "pipeline" / "train" / "x.py").write_text(source + "from pipeline.data.loader import build_train_loader\n")
    assert violations(tmp_path / "pipeline")[0].startswith(expected)
    assert len(violations(tmp_path / "pipeline")) == 1  # data and the core are allowed


def test_the_core_importing_a_stage_is_caught(tmp_path):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "score.py").write_text("from pipeline.sde import SDE\nfrom pipeline.data.reader import shard_urls\n"
                                                    "from pipeline.train.step import TrainStep\n")
    assert violations(tmp_path / "pipeline") == [
        "pipeline.score (core) imports pipeline.data.reader (stage data)",
        "pipeline.score (core) imports pipeline.train.step (stage train)",
    ]


# --------------------------------------------------------------------------- run-dir file names
def docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes of a module and its classes and functions (prose, not code)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                found.add(id(first.value))
    return found


def spelled_run_names(source: str, names: set[str]) -> list[str]:
    """Run-dir names ``source`` spells: a string equal to a file name of the layout (one with a dot:
    config.yaml, state.json, ...), or any layout name joined onto a path (``run / "export"``).
    Docstrings and f-strings (messages) do not count."""
    tree = ast.parse(source)
    prose, bad = docstrings(tree), []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            prose |= {id(v) for v in node.values}
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and side.value in names:
                    bad.append(f"line {side.lineno}: / {side.value!r}")
                    prose.add(id(side))  # reported once
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose
                and "." in node.value and node.value in names):
            bad.append(f"line {node.lineno}: {node.value!r}")
    return sorted(set(bad))


# names of the layout that other files own as well (not a run's): the shard cache's lock
OTHER_OWNERS = {("data/shards.py", ".lock")}


def test_only_rundir_spells_a_run_dir_file_name():
    from pipeline.rundir import LAYOUT_NAMES

    names = set(LAYOUT_NAMES)
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if rel == "rundir.py":
            continue
        found = spelled_run_names(path.read_text(), {n for n in names if (rel, n) not in OTHER_OWNERS})
        bad += [f"{rel} {where}" for where in found]
    assert bad == []
    # rundir.py itself joins paths only with its named constants
    assert [b for b in spelled_run_names((PKG / "rundir.py").read_text(), names) if " / " in b] == []


def test_a_spelled_run_dir_name_is_caught():
    names = {"config.yaml", "export", "samples.npz"}
    source = ('"""Writes config.yaml."""\nimport json\n\ndef f(run, out):\n    """Into export/."""\n'
              '    a = run / "export"\n    b = out / "samples.npz"\n    c = {"name": "config.yaml"}\n'
              '    d = "export"\n    print(f"wrote {out}/samples.npz")\n')
    assert spelled_run_names(source, names) == ["line 6: / 'export'", "line 7: / 'samples.npz'",
                                                "line 8: 'config.yaml'"]


# --------------------------------------------------------------------------- private names
ROOT = PKG.parent


def private_uses(source: str) -> list[str]:
    """Underscore names of pipeline modules used from outside them: ``from pipeline.x import _y``,
    ``m._y`` / ``C._y`` on a pipeline module or class imported here, ``setattr(m, "_y", ...)``
    (monkeypatch) on one. Dunder names are not private."""
    tree = ast.parse(source)
    private = lambda name: name.startswith("_") and not name.startswith("__")  # noqa: E731
    bound, bad = set(), []  # local names bound to a pipeline module or a name imported from one
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "pipeline"):
            for a in node.names:
                if private(a.name):
                    bad.append(f"line {node.lineno}: from {'.' * node.level}{node.module or ''} import {a.name}")
                bound.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            bound |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] == "pipeline"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                bad.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setattr"
              and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id in bound
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and private(node.args[1].value)):
            bad.append(f"line {node.lineno}: setattr({node.args[0].id}, {node.args[1].value!r})")
    return sorted(set(bad))


def test_no_module_uses_another_modules_private_names():
    bad = [f"{path.relative_to(ROOT)} {where}" for folder in ("pipeline", "tests", "benchmarks")
           for path in sorted((ROOT / folder).rglob("*.py")) for where in private_uses(path.read_text())]
    assert bad == []


def test_a_private_name_used_across_modules_is_caught():
    source = ("import pipeline.sde\nimport pipeline.eval.features as feats\nfrom pipeline import demo\n"
              "from pipeline.config import _build, load_config\nfrom pipeline.publish.hub import HubPusher\n\n"
              "def f(monkeypatch, x):\n    pipeline.sde._bcast(x)\n    feats._cache.clear()\n"
              "    HubPusher._snapshot(x)\n    monkeypatch.setattr(demo, '_cpu', None)\n"
              "    x._private, load_config.__name__, demo.main\n")
    assert private_uses(source) == ["line 10: HubPusher._snapshot", "line 11: setattr(demo, '_cpu')",
                                    "line 4: from pipeline.config import _build", "line 8: pipeline.sde._bcast",
                                    "line 9: feats._cache"]


# --------------------------------------------------------------------------- status lines and exit codes
STATUS = "pipeline.status"  # the one module that writes "[fpdiff]" lines and errors, and spells the exit codes
EXIT_LITERALS = {1, 2, 3, 75, 130}  # pipeline.status.EXIT_* other than 0


def _strings(node: ast.AST):
    """String constants in ``node``, an f-string's literal parts included."""
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            yield n.value


def _is_exit_literal(node) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is int and node.value in EXIT_LITERALS


def own_reporting(pkg: Path) -> list[str]:
    """Modules other than pipeline.status that write a "[fpdiff]" line or to stderr, use ``logging``, or
    spell an exit code as a number (in ``sys.exit``, ``SystemExit`` or a ``return``)."""
    bad = []
    for path in sorted(pkg.rglob("*.py")):
        mod = module_name(path, pkg)
        if mod == STATUS:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            where = f"{mod}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call) and any("[fpdiff]" in s for s in _strings(node)):
                bad.append(f"{where} writes a [fpdiff] line itself")
            elif isinstance(node, ast.Attribute) and ast.unparse(node) == "sys.stderr":
                bad.append(f"{where} writes to stderr itself")
            elif isinstance(node, ast.Import) and any(a.name == "logging" for a in node.names):
                bad.append(f"{where} imports logging")
            elif isinstance(node, ast.ImportFrom) and node.module == "logging":
                bad.append(f"{where} imports from logging")
            elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("sys.exit", "exit", "SystemExit") \
                    and node.args and _is_exit_literal(node.args[0]):
                bad.append(f"{where} exits with the literal {node.args[0].value}")
            elif isinstance(node, ast.Return) and _is_exit_literal(node.value):
                bad.append(f"{where} returns the literal exit code {node.value.value}")
    return bad


def test_status_lines_errors_and_exit_codes_come_only_from_pipeline_status():
    assert own_reporting(PKG) == []


def test_a_module_reporting_by_itself_is_caught(tmp_path):
    (tmp_path / "pipeline" / "train").mkdir(parents=True)
    (tmp_path / "pipeline" / "status.py").write_text('import sys\nEXIT_BAD_CONFIG = 2\n'
                                                     'def say(m):\n    print(f"[fpdiff] {m}", file=sys.stderr)\n')
    (tmp_path / "pipeline" / "train" / "x.py").write_text(
        'import logging\nimport sys\nlog = logging.getLogger("x")\n'
        'def f(n):\n    print(f"[fpdiff] {n} steps")\n    return 1.0\n'
        'def main():\n    if f(1):\n        return 2\n    sys.exit(75)\n'
        'def ok():\n    print("fpdiff x: no such file", file=sys.stderr)\n    return 0\n')
    assert sorted(own_reporting(tmp_path / "pipeline"), key=lambda s: int(s.split(":")[1].split()[0])) == [
        "pipeline.train.x:1 imports logging",
        "pipeline.train.x:5 writes a [fpdiff] line itself",
        "pipeline.train.x:9 returns the literal exit code 2",
        "pipeline.train.x:10 exits with the literal 75",
        "pipeline.train.x:12 writes to stderr itself",
    ]


# --------------------------------------------------------------------------- imports at the top
def undeclared_deferred_imports(source: str) -> list[str]:
    """Imports inside a function or class of ``source`` that do not say why they are there: a comment
    with ``deferred:`` on the import (or on the line above it), for an optional or heavy dependency,
    torch kept out of ``fpdiff --help``, or an import cycle. Module-level imports are fine."""
    tree, lines, bad = ast.parse(source), source.splitlines(), []
    for scope in ast.walk(tree):
        if not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for node in ast.walk(scope):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                said = lines[node.lineno - 1:node.end_lineno]
                above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
                said += [above] if above.startswith("#") else []  # a comment line of its own
                if not any("deferred:" in line.partition("#")[2] for line in said):
                    bad.append(f"line {node.lineno}: {ast.unparse(node)}")
    return sorted(set(bad))


def test_imports_are_at_the_top_unless_deferred_with_a_reason():
    bad = [f"{path.relative_to(ROOT)} {where}" for path in sorted(PKG.rglob("*.py"))
           for where in undeclared_deferred_imports(path.read_text())]
    assert bad == []


def test_an_import_inside_a_function_without_a_reason_is_caught():
    source = ('"""from x import y (prose)."""\nimport json\n\n\ndef f():\n    """import os (prose)."""\n'
              "    import os\n    from pipeline.sde import build_sde  # the SDE\n"
              "    import wandb  # deferred: optional\n    import yaml\n    # deferred: a cycle\n    from pipeline import cli\n\n\n"
              "class C:\n    def g(self):\n        from pipeline.config import (ConfigError,\n"
              "                                     load_config)\n")
    assert undeclared_deferred_imports(source) == [
        "line 10: import yaml", "line 17: from pipeline.config import ConfigError, load_config", "line 7: import os",
        "line 8: from pipeline.sde import build_sde"]
