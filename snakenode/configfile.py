"""Small, comment-preserving edits of HOME/snakenode.toml (for `snakenode trust add` and the demo).

Only one-line `key = [...]` arrays are rewritten; everything else in the file is left byte for byte.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path


class ConfigFileError(Exception):
    pass


def add_to_list(path: Path, key: str, value: str) -> bool:
    """Add `value` to the string list `key`; returns False when it was already there."""
    text = path.read_text() if path.exists() else ""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{path} is not valid TOML ({exc}); fix it first") from None
    current = doc.get(key, [])
    if not isinstance(current, list):
        raise ConfigFileError(f"{key} in {path} is not a list; fix it by hand")
    if value in current:
        return False
    new_line = f"{key} = {json.dumps([*current, value])}"
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=\s*\[[^\n]*\]\s*$", re.M)
    if key in doc:
        if not pattern.search(text):
            raise ConfigFileError(f"{key} in {path} spans several lines; add {value} to it by hand")
        text = pattern.sub(new_line, text, count=1)
    else:
        # Top-level keys must precede any [table]; we only have top-level settings, so append.
        text = (text.rstrip("\n") + "\n" if text else "") + new_line + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True
