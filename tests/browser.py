"""Headless Chromium for the dashboard test: the rendered DOM (after the page's scripts ran) and screenshots.

Chromium comes from the machine's package manager (scripts/apt-deps.sh installs Debian's `chromium`); when
it is missing, `chromium()` runs that script once and looks again. `--dump-dom` prints the DOM as the page
left it after `budget_ms` of virtual time (the page's own polls have run), not the HTML source.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium() -> str:
    for _attempt in range(2):
        for name in NAMES:
            path = shutil.which(name)
            if path:
                return path
        subprocess.run([str(REPO / "scripts" / "apt-deps.sh")], timeout=600, check=False)
    raise AssertionError("headless Chromium is needed for the dashboard test: install Debian's `chromium` "
                         "(scripts/apt-deps.sh does) or put chromium on PATH")


def _argv(extra: list[str], budget_ms: int, width: int, height: int) -> list[str]:
    argv = [chromium(), "--headless", "--disable-gpu", "--no-first-run", "--disable-extensions",
            "--disable-dev-shm-usage", f"--window-size={width},{height}", "--hide-scrollbars",
            f"--virtual-time-budget={budget_ms}", *extra]
    if os.geteuid() == 0:
        argv.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    return argv


def dump_dom(url: str, budget_ms: int = 4000, timeout: float = 60) -> str:
    r = subprocess.run([*_argv(["--dump-dom"], budget_ms, 1280, 900), url], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0 and "<html" in r.stdout, f"chromium failed ({r.returncode}): {r.stderr[-2000:]}"
    return r.stdout


def screenshot(url: str, out: Path, width: int = 1280, height: int = 900, budget_ms: int = 4000,
               timeout: float = 60) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([*_argv([f"--screenshot={out}"], budget_ms, width, height), url], capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0 and out.exists() and out.stat().st_size > 0, \
        f"chromium screenshot failed ({r.returncode}): {r.stderr[-2000:]}"
    return out


class Element:
    def __init__(self, tag: str, attrs: dict[str, str]) -> None:
        self.tag = tag
        self.attrs = attrs
        self.text = ""

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())


class Dom(HTMLParser):
    """Every element of a dumped DOM with its attributes and direct text, in document order."""

    VOID = {"meta", "link", "br", "img", "input", "hr", "col", "source"}

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[Element] = []
        self._open: list[Element] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        el = Element(tag, {k: v or "" for k, v in attrs})
        self.elements.append(el)
        if tag not in self.VOID:
            self._open.append(el)

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop().tag == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._open:
            self._open[-1].text += data

    def by_id(self, ident: str) -> Element:
        found = [e for e in self.elements if e.attrs.get("id") == ident]
        assert found, f"no element #{ident} in the rendered page"
        return found[0]

    def select(self, tag: str, cls: str | None = None, **attrs: Any) -> list[Element]:
        return [e for e in self.elements if e.tag == tag and (cls is None or cls in e.classes)
                and all(e.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())]
