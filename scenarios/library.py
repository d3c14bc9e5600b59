"""The scenario library (scenarios/library/*.toml, shipped as package data) and name resolution.

`run` accepts a path, a library name (`ring5-dropout`) or the path the issue shows
(`scenarios/ring5-dropout.toml`), which resolves to the library file of that name when no such file exists.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

LIBRARY_DIR = Path(str(resources.files("scenarios").joinpath("library")))
# The order of `list` and `run-all`: quick ones first, so a broken build fails early.
ORDER = ("line3-smoke", "ring5-dropout", "star8-churn", "freeze-crash", "slow-link", "partition-heal", "hetero6",
         "cs-coordinator-loss")


def library() -> list[Path]:
    files = {p.stem: p for p in LIBRARY_DIR.glob("*.toml")}
    ordered = [files.pop(n) for n in ORDER if n in files]
    return ordered + [files[k] for k in sorted(files)]


def resolve(text: str) -> Path:
    """A scenario file from a path or a library name; FileNotFoundError says what exists."""
    p = Path(text)
    if p.is_file():
        return p
    stem = p.name.removesuffix(".toml")
    cand = LIBRARY_DIR / f"{stem}.toml"
    if cand.is_file():
        return cand
    names = ", ".join(q.stem for q in library())
    raise FileNotFoundError(f"no scenario file {text!r} and no library scenario named {stem!r}; "
                            f"library: {names} (`python -m scenarios list`)")
