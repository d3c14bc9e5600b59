"""Issue 7: no pickle in project code (docs/DESIGN.md, "Security model").

Unpickling runs code chosen by whoever wrote the bytes, so nothing that crosses the network or is read
from disk may be unpickled. An AST walk over snakenode/, bootstrap/, scenarios/ and benchmarks/ refuses:
importing pickle, _pickle, cPickle, cloudpickle, dill or shelve (import or from-import, also through
__import__ / importlib.import_module with a literal name); `torch.load` without `weights_only=True` (or
with a `pickle_module`); `np.load` / `numpy.load` with `allow_pickle` anything but a literal False; and
pickle-loading calls of other libraries (`pandas.read_pickle`, `joblib.load`, `*.Unpickler`).
Aliases are followed (`import numpy as np`, `from torch import load as tl`). The checker is tested on
bad snippets, so it can fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT_DIRS = ("snakenode", "bootstrap", "scenarios", "benchmarks")
BANNED_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "shelve"}
BANNED_CALLS = {
    "pandas.read_pickle": "pandas.read_pickle unpickles its input",
    "joblib.load": "joblib.load unpickles its input",
    "numpy.lib.format.read_array": "read_array can unpickle object arrays",
}


def _banned_module(name: str) -> bool:
    return name.split(".")[0] in BANNED_MODULES


def _literal(node: ast.expr | None) -> object:
    return node.value if isinstance(node, ast.Constant) else _NOT_LITERAL


_NOT_LITERAL = object()


class _Checker(ast.NodeVisitor):
    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.aliases: dict[str, str] = {}  # local name -> dotted module path or object
        self.problems: list[str] = []

    def _flag(self, node: ast.AST, message: str) -> None:
        self.problems.append(f"{self.filename}:{getattr(node, 'lineno', 0)}: {message}")

    # --- imports ---------------------------------------------------------------------------------------
    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if _banned_module(a.name):
                self._flag(node, f"import of {a.name} (pickle-based; use msgpack or safetensors)")
            self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        mod = node.module or ""
        if node.level == 0 and _banned_module(mod):
            self._flag(node, f"from {mod} import ... (pickle-based; use msgpack or safetensors)")
        for a in node.names:
            if node.level == 0 and a.name in BANNED_MODULES and not _banned_module(mod):
                self._flag(node, f"from {mod} import {a.name} (pickle-based)")
            if node.level == 0 and mod:
                self.aliases[a.asname or a.name] = f"{mod}.{a.name}"
        self.generic_visit(node)

    # --- calls -----------------------------------------------------------------------------------------
    def _dotted(self, node: ast.expr) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self._dotted(node.value)
            return None if base is None else f"{base}.{node.attr}"
        return None

    def visit_Call(self, node: ast.Call) -> None:
        name = self._dotted(node.func) or ""
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        if name in ("__import__", "importlib.import_module") and node.args:
            target = _literal(node.args[0])
            if isinstance(target, str) and _banned_module(target):
                self._flag(node, f"dynamic import of {target} (pickle-based)")
        elif name.split(".")[0] in BANNED_MODULES:
            self._flag(node, f"call of {name} (pickle)")
        elif name in ("torch.load", "torch.serialization.load"):
            if _literal(kw.get("weights_only")) is not True:
                self._flag(node, f"{name} without weights_only=True (unpickles arbitrary objects)")
            if "pickle_module" in kw:
                self._flag(node, f"{name} with a pickle_module")
        elif name in ("numpy.load", "np.load"):
            if "allow_pickle" in kw and _literal(kw["allow_pickle"]) is not False:
                self._flag(node, f"{name} with allow_pickle={ast.unparse(kw['allow_pickle'])} (unpickles object arrays)")
            if len(node.args) >= 3:
                self._flag(node, f"{name} with positional allow_pickle (unpickles object arrays)")
        elif name in BANNED_CALLS:
            self._flag(node, BANNED_CALLS[name])
        elif name.endswith(".Unpickler") or name == "Unpickler":
            self._flag(node, f"{name} (pickle)")
        self.generic_visit(node)


def find_pickle_uses(source: str, filename: str = "<snippet>") -> list[str]:
    """Every forbidden pickle use in `source`, as `file:line: what`."""
    checker = _Checker(filename)
    checker.visit(ast.parse(source, filename))
    return checker.problems


def project_files() -> list[Path]:
    return sorted(p for d in PROJECT_DIRS for p in (REPO / d).rglob("*.py") if ".venv" not in p.parts)


def test_project_code_never_unpickles() -> None:
    files = project_files()
    assert len(files) > 40, "the walk found the project's modules"
    problems = [p for f in files for p in find_pickle_uses(f.read_text(encoding="utf-8"), str(f.relative_to(REPO)))]
    assert problems == [], "\n".join(problems)


BAD = {
    "import": "import pickle\n",
    "import_alias": "import cloudpickle as cp\n",
    "import_submodule": "import dill.source\n",
    "from_import": "from pickle import loads\n",
    "from_import_c": "from _pickle import Unpickler\n",
    "shelve": "import shelve\n",
    "dunder_import": "m = __import__('pickle')\n",
    "importlib": "import importlib\nm = importlib.import_module('dill')\n",
    "torch_load_plain": "import torch\nsd = torch.load('m.pt')\n",
    "torch_load_false": "import torch\nsd = torch.load(f, weights_only=False)\n",
    "torch_load_dynamic": "import torch\nsd = torch.load(f, weights_only=flag)\n",
    "torch_load_alias": "from torch import load as tl\nsd = tl(f)\n",
    "torch_module_alias": "import torch as T\nsd = T.load(f)\n",
    "torch_serialization": "import torch\nsd = torch.serialization.load(f, weights_only=True, pickle_module=p)\n",
    "np_allow_pickle": "import numpy as np\na = np.load('x.npy', allow_pickle=True)\n",
    "numpy_allow_pickle": "import numpy\na = numpy.load(f, allow_pickle=yes)\n",
    "np_positional": "import numpy as np\na = np.load(f, None, True)\n",
    "np_from_import": "from numpy import load\na = load(f, allow_pickle=True)\n",
    "pandas": "import pandas as pd\ndf = pd.read_pickle('x')\n",
    "joblib": "import joblib\nm = joblib.load('m.joblib')\n",
    "nested_in_function": "def f():\n    import pickle\n    return pickle.loads(b'')\n",
    "from_package": "from six.moves import cPickle\n",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_checker_catches_bad_snippet(case: str) -> None:
    problems = find_pickle_uses(BAD[case])
    assert problems, f"the checker missed {case!r}: {BAD[case]!r}"
    assert all(p.startswith("<snippet>:") for p in problems)


GOOD = {
    "torch_weights_only": "import torch\nsd = torch.load(f, weights_only=True, map_location='cpu')\n",
    "np_load_plain": "import numpy as np\na = np.load('x.npy')\n",
    "np_allow_false": "import numpy as np\na = np.load(f, allow_pickle=False)\n",
    "np_loadtxt": "import numpy as np\na = np.loadtxt(f)\n",
    "msgpack": "import msgpack\nx = msgpack.unpackb(b'', raw=False)\n",
    "safetensors": "from safetensors.numpy import load_file\nt = load_file('x')\n",
    "pickletools_word": "x = 'pickle'\n# import pickle\n",
    "json_load": "import json\nx = json.load(f)\n",
    "other_load": "import yaml\nx = yaml.safe_load(f)\n",
}


@pytest.mark.parametrize("case", sorted(GOOD))
def test_checker_accepts_safe_code(case: str) -> None:
    assert find_pickle_uses(GOOD[case]) == []


def test_whole_bad_file_reports_every_line() -> None:
    src = "".join(BAD[c] for c in ("import", "torch_load_plain", "np_allow_pickle"))
    lines = sorted(int(p.split(":")[1]) for p in find_pickle_uses(src))
    assert lines == [1, 3, 5], lines
