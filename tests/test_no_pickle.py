"""No path in molora/, train/ or bench/ can run code from a file: no pickle-family import, no torch.load without
weights_only=True, no allow_pickle=True, no eval/exec. The walk reads the source (ast), so a new call site fails
here the day it is written; the counter-test shows each kind of call is caught."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("molora", "train", "bench")
UNPICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def findings(source: str, where: str = "<snippet>") -> list[str]:
    """`where:line: what` for every call or import in `source` that could run code from a file."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = f"{where}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNPICKLERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLERS:
            found.append(f"{line}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            found += [f"{line}: {problem}" for problem in _call_problems(node)]
    return found


def _call_problems(call: ast.Call) -> list[str]:
    name = ast.unparse(call.func)
    keywords = {k.arg: k.value for k in call.keywords}
    problems = []
    if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
        problems.append(f"{name}()")
    if name.endswith("load") and name.split(".")[0] == "torch":
        flag = keywords.get("weights_only")
        if not (isinstance(flag, ast.Constant) and flag.value is True):
            problems.append(f"{name}() without weights_only=True")
    elif "weights_only" in keywords and not (
        isinstance(keywords["weights_only"], ast.Constant) and keywords["weights_only"].value is True
    ):
        problems.append(f"{name}(weights_only={ast.unparse(keywords['weights_only'])})")
    pickle_flag = keywords.get("allow_pickle")
    if pickle_flag is not None and not (isinstance(pickle_flag, ast.Constant) and pickle_flag.value is False):
        problems.append(f"{name}(allow_pickle={ast.unparse(pickle_flag)})")
    return problems


def test_no_source_file_can_run_code_from_a_file():
    files = sorted(p for folder in SCANNED for p in (REPO / folder).rglob("*.py"))
    assert len(files) > 40  # the walk sees the code base
    found = [f for path in files for f in findings(path.read_text(), str(path.relative_to(REPO)))]
    assert found == []


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "import dill as d",
        "from joblib import load",
        "from _pickle import loads",
        "torch.load(path)",
        "torch.load(path, weights_only=False)",
        "torch.load(path, weights_only=flag)",
        "torch.serialization.load(path)",
        "something.load(path, weights_only=False)",
        "numpy.load(path, allow_pickle=True)",
        "np.load(path, allow_pickle=flag)",
        "eval(text)",
        "exec(code)",
    ],
)
def test_the_walk_catches_each_kind_of_call(snippet):
    assert len(findings(snippet)) == 1


@pytest.mark.parametrize("snippet", ["torch.load(path, weights_only=True)", "np.load(path, allow_pickle=False)"])
def test_the_walk_lets_the_safe_forms_through(snippet):
    assert findings(snippet) == []
