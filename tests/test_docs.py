"""The docs must match the code: settings, protocol ids, decline reasons, hop-log events, counters."""

from __future__ import annotations

import re
from pathlib import Path

from snakenode import config, wire
from snakenode.snake import hoplog, messages

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_operations_lists_every_setting_exactly() -> None:
    text = (DOCS / "OPERATIONS.md").read_text()
    assert config.operations_table() in text, "regenerate the table: python -c 'from snakenode.config import " \
                                              "operations_table; print(operations_table())'"


def test_protocol_documents_ids_messages_and_events() -> None:
    text = (DOCS / "PROTOCOL.md").read_text()
    for pid in wire.SNAKE_PROTOCOLS:
        assert f"`{pid}`" in text, pid
    for reason in messages.DECLINE_REASONS:
        assert f"`{reason}`" in text, reason
    for event in hoplog.EVENTS:
        assert f"`{event}`" in text, event
    for name in wire.TOPIC_NAMES:
        assert f"snake/<net>/{name}/1" in text


def test_every_counter_family_in_the_code_is_documented() -> None:
    text = (DOCS / "PROTOCOL.md").read_text()
    root = Path(__file__).resolve().parents[1]
    kinds: set[str] = set()
    for path in [*root.glob("snakenode/**/*.py"), *root.glob("bootstrap/*.py")]:
        kinds.update(re.findall(r'counters\.add\(f?"([a-z_.{}]+)', path.read_text()))
    assert kinds
    for kind in sorted(kinds):
        plain = re.sub(r"\{[^}]*\}", "", kind)  # f-string placeholders name the varying part
        family = ".".join(p for p in plain.split(".")[:2] if p)
        head, _, second = family.partition(".")
        protos = re.search(r"`<proto>` in a kind is one of the stream\s+names ([^.]+)\.", text)
        generic = protos is not None and f"`{second}`" in protos.group(1) and f"{head}.<proto>" in text
        assert family in text or f"`{head}.*`" in text or generic, \
            f"counter {kind!r}: document the {family!r} family in docs/PROTOCOL.md"


# The project is self-contained: docs and docstrings cite files inside the repository only. A bare
# DESIGN.md outside docs/ means a design document that is not in the repository (ours is docs/DESIGN.md).
_OUTSIDE = [re.compile(p) for p in (r"\.\./shared", r"/work/\w", r"(?<![\w/.-])notes/[\w-]+\.md")]
_BARE_DESIGN = re.compile(r"(?<![\w/.-])DESIGN\.md")


def _outside_citations() -> list[str]:
    root = Path(__file__).resolve().parents[1]
    files = [root / "README.md"] + [p for d in ("snakenode", "bootstrap", "scenarios", "docs", "benchmarks", "tests")
                                    for p in sorted((root / d).rglob("*"))
                                    if p.suffix in (".py", ".md", ".toml") and "results" not in p.parts]
    out = []
    for path in files:
        rel = str(path.relative_to(root))
        if rel == "tests/test_docs.py":
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            pats = _OUTSIDE + ([] if rel.startswith("docs/") else [_BARE_DESIGN])
            if any(p.search(line) for p in pats):
                out.append(f"{rel}:{n}: {line.strip()}")
    return out


def test_docs_and_docstrings_cite_only_files_in_the_repository() -> None:
    found = _outside_citations()
    assert not found, "cite docs/DESIGN.md (or another file in the repository) instead:\n" + "\n".join(found)
