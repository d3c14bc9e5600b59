"""The layering of the code, enforced statically the way tests/test_no_pickle.py enforces no-pickle.

Every .py file under snakenode/, bootstrap/ and scenarios/ is parsed with ast and every import counts:
module level, inside functions, under `if TYPE_CHECKING:` (a circle that only a lazy import holds
together is still a circle to a reader). The rules (docs/ARCHITECTURE.md, "Layers: who imports whom"):

- no import circle among the project's modules;
- snakenode.net and snakenode.train never reach the snake package (the layer store and bundle format live
  below all three, in snakenode.layers);
- snakenode.layers reaches none of net, train and snake;
- bootstrap reaches neither snakenode.train nor torch, by any chain (a bootstrap peer starts in a second);
- the daemon process never imports torch: nothing reachable from snakenode.daemon or from the start path
  of snakenode.cli does (torch lives in the worker process);
- the pure decision modules (snake/routing.py, window.py, state.py, guard.py and the retry policy)
  reach neither trio nor snakenode.net;
- no module over 600 lines.

"Reach" follows imports transitively, including the package `__init__` modules an import executes. Each
failure names the chain of imports that breaks the rule. The checker itself is tested on a small
synthetic tree, so it can fail.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("snakenode", "bootstrap", "scenarios")
MAX_LINES = 600



@dataclass
class Graph:
    files: dict[str, Path] = field(default_factory=dict)  # module name -> file
    edges: dict[str, set[str]] = field(default_factory=dict)  # project modules each module imports
    external: dict[str, set[str]] = field(default_factory=dict)  # top-level outside modules it imports
    lines: dict[str, int] = field(default_factory=dict)

    def is_package(self, mod: str) -> bool:
        return self.files[mod].name == "__init__.py"

    def ancestors(self, mod: str) -> list[str]:
        """The packages whose `__init__` runs before `mod` does."""
        parts = mod.split(".")
        return [p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in self.files]

    def circle_edges(self, mod: str) -> set[str]:
        """Imports that can form a circle: a submodule importing its own package is how packages work."""
        return {t for t in self.edges[mod] if not (self.is_package(t) and mod.startswith(t + "."))}

    def reach_edges(self, mod: str) -> set[str]:
        """Modules that run when `mod` is imported: its imports and the packages around each of them."""
        out = set(self.ancestors(mod))
        for t in self.edges[mod]:
            out.add(t)
            out.update(self.ancestors(t))
        out.discard(mod)
        return out


def _module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(tree: ast.AST, mod: str, is_package: bool) -> set[str]:
    """Absolute dotted names of everything `tree` imports, anywhere in it (`from a import b` gives a and
    a.b: b may be a module)."""
    package = mod if is_package else mod.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
    return out


def build_graph(root: Path, packages: Iterable[str] = PACKAGES,
                only_functions: dict[str, set[str]] | None = None) -> Graph:
    """The import graph of `packages` under `root`. `only_functions` limits a module's imports to its
    module-level statements plus the named functions (a command's start path)."""
    g = Graph()
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            g.files[_module_name(root, path)] = path
    for mod, path in g.files.items():
        text = path.read_text(encoding="utf-8")
        g.lines[mod] = len(text.splitlines())
        tree: ast.AST = ast.parse(text, str(path))
        if only_functions and mod in only_functions:
            keep = only_functions[mod]
            body = [n for n in tree.body if not isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                    or n.name in keep]
            tree = ast.Module(body=body, type_ignores=[])
        names = _imported_names(tree, mod, path.name == "__init__.py")
        g.edges[mod] = set()
        g.external[mod] = set()
        for name in names:
            target = _resolve(name, g.files)
            if target is None:
                if name.split(".")[0] not in packages:
                    g.external[mod].add(name.split(".")[0])
            elif target != mod:
                g.edges[mod].add(target)
    return g


def _resolve(name: str, files: dict[str, Path]) -> str | None:
    while name:
        if name in files:
            return name
        name = name.rpartition(".")[0]
    return None


def circles(g: Graph) -> list[list[str]]:
    """One concrete cycle (a -> b -> ... -> a) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    groups: list[set[str]] = []

    def strong(v: str) -> None:  # Tarjan; the graph has a few hundred nodes
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.circle_edges(v)):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                groups.append(comp)

    for v in sorted(g.files):
        if v not in index:
            strong(v)
    out = []
    for comp in groups:
        start = min(comp)
        path = _path(start, lambda m, s=start: s in g.circle_edges(m), lambda m, c=comp: g.circle_edges(m) & c)
        assert path is not None
        out.append([*path, start])
    return sorted(out)


def _path(start: str, hit: Callable[[str], bool], nexts: Callable[[str], Iterable[str]]) -> list[str] | None:
    """The shortest import chain from `start` to a module where `hit` holds (breadth first)."""
    parent: dict[str, str | None] = {start: None}
    todo = deque([start])
    while todo:
        m = todo.popleft()
        if hit(m):
            chain = [m]
            while parent[chain[-1]] is not None:
                chain.append(parent[chain[-1]])  # type: ignore[arg-type]
            return chain[::-1]
        for t in sorted(nexts(m)):
            if t not in parent:
                parent[t] = m
                todo.append(t)
    return None


def reach_chains(g: Graph, sources: Iterable[str], bad: Callable[[str], bool]) -> list[str]:
    """For each source that reaches a module where `bad` holds: the chain, as `a -> b -> c`."""
    out = []
    for s in sorted(sources):
        path = _path(s, bad, g.reach_edges)
        if path is not None:
            out.append(" -> ".join(path))
    return out


def _in(*prefixes: str) -> Callable[[str], bool]:
    return lambda m: any(m == p or m.startswith(p + ".") for p in prefixes)


def _imports_external(g: Graph, *names: str) -> Callable[[str], bool]:
    return lambda m: bool(g.external.get(m, set()) & set(names))


def _fmt(chains: list[str], what: str) -> str:
    return f"{what}:\n  " + "\n  ".join(chains)


# the functions of snakenode/cli.py that the daemon process runs (`snakenode start`)
CLI_START_PATH = {"snakenode.cli": {"start", "_check_data", "_start_signature", "_fail"}}


@pytest.fixture(scope="module")
def graph() -> Graph:
    g = build_graph(REPO)
    assert len(g.files) > 60 and "snakenode.daemon" in g.files, "the walk found the project's modules"
    return g


# ---------------------------------------------------------------------------------------------- the rules


def test_no_import_circle(graph: Graph) -> None:
    found = circles(graph)
    assert not found, _fmt([" -> ".join(c) for c in found], "import circles (break them: move the shared part "
                                                             "below both, or pass it in)")


def test_net_and_train_never_reach_the_snake_package(graph: Graph) -> None:
    sources = [m for m in graph.files if _in("snakenode.net", "snakenode.train")(m)]
    chains = reach_chains(graph, sources, _in("snakenode.snake"))
    assert not chains, _fmt(chains, "net/train reach snakenode.snake (what they need belongs below, e.g. "
                                    "in snakenode.layers)")


def test_layers_reach_none_of_net_train_snake(graph: Graph) -> None:
    sources = [m for m in graph.files if _in("snakenode.layers")(m)]
    chains = reach_chains(graph, sources, _in("snakenode.net", "snakenode.train", "snakenode.snake"))
    assert not chains, _fmt(chains, "snakenode.layers must stay below net, train and snake")


def test_bootstrap_reaches_neither_train_nor_torch(graph: Graph) -> None:
    sources = [m for m in graph.files if _in("bootstrap")(m)]
    chains = reach_chains(graph, sources, lambda m: _in("snakenode.train")(m) or _imports_external(graph, "torch")(m))
    assert not chains, _fmt(chains, "the bootstrap peer reaches the training package or torch")


def test_the_daemon_process_never_imports_torch() -> None:
    g = build_graph(REPO, only_functions=CLI_START_PATH)
    chains = reach_chains(g, ["snakenode.daemon", "snakenode.cli"], _imports_external(g, "torch"))
    assert not chains, _fmt(chains, "the daemon process reaches torch (torch belongs in the worker process: "
                                    "talk to it through snakenode.train.client)")


PURE = ("routing", "window", "state", "guard", "modes")


def _pure_modules(g: Graph) -> list[str]:
    snake = [m for m in g.files if m.startswith("snakenode.snake.")]
    return sorted(m for m in snake if m.rsplit(".", 1)[1] in PURE or "retry" in m or "policy" in m)


def test_pure_decision_modules_reach_neither_trio_nor_net(graph: Graph) -> None:
    pure = _pure_modules(graph)
    assert {"snakenode.snake.routing", "snakenode.snake.window", "snakenode.snake.state"} <= set(pure)
    chains = reach_chains(graph, pure, lambda m: _in("snakenode.net")(m) or _imports_external(graph, "trio")(m))
    assert not chains, _fmt(chains, "pure decision logic reaches I/O (trio or snakenode.net): pass the "
                                    "facts in, return a decision")


def test_no_module_over_600_lines(graph: Graph) -> None:
    big = sorted(f"{m} ({n} lines)" for m, n in graph.lines.items() if n > MAX_LINES)
    assert not big, _fmt(big, f"modules over {MAX_LINES} lines (split them by concern)")


# ---------------------------------------------------------------------------------------------- the checker


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_checker_sees_lazy_and_type_checking_circles(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n",
        "pkg/b.py": "def f():\n    from . import c\n",
        "pkg/c.py": "import pkg.a\n",
        "pkg/d.py": "from pkg import a\n",
    })
    g = build_graph(root, ["pkg"])
    assert circles(g) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_checker_follows_chains_and_package_inits(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "top/__init__.py": "",
        "top/boot.py": "def main():\n    from top.mid import x\n",
        "top/mid.py": "from top.sub import leaf\n",
        "top/sub/__init__.py": "import torch\n",
        "top/sub/leaf.py": "",
        "top/clean.py": "import json\n",
    })
    g = build_graph(root, ["top"])
    torch = _imports_external(g, "torch")
    assert reach_chains(g, ["top.boot"], torch) == ["top.boot -> top.mid -> top.sub"]
    assert reach_chains(g, ["top.clean"], torch) == []
    assert circles(g) == [], "a submodule importing its own package is no circle"


def test_checker_limits_a_module_to_its_start_path(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "c/__init__.py": "",
        "c/cli.py": "import json\ndef start():\n    from c import node\ndef other():\n    import torch\n",
        "c/node.py": "",
    })
    assert reach_chains(build_graph(root, ["c"]), ["c.cli"], _imports_external(build_graph(root, ["c"]), "torch"))
    g = build_graph(root, ["c"], only_functions={"c.cli": {"start"}})
    assert g.edges["c.cli"] == {"c", "c.node"} and reach_chains(g, ["c.cli"], _imports_external(g, "torch")) == []
