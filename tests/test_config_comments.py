"""Project rule: every YAML key in configs/ says what it does (and, where it matters, why) in a comment.

A key counts as commented when its line has a trailing `# ...` comment or the line directly above it is a comment
line. List items (`- foo`) are not keys; the key that owns the list carries the comment.
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
KEY = re.compile(r"^(\s*)([A-Za-z0-9_@/.\-]+):(.*)$")  # `key: value` or `key:`; `- item` lines never match


def uncommented_keys(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every key line with no trailing comment and no comment line directly above."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = KEY.match(line)
        if not m or "#" in m.group(3):
            continue
        if i > 0 and lines[i - 1].lstrip().startswith("#"):
            continue
        out.append((i + 1, line))
    return out


def test_rule_examples():
    text = "a: 1  # why\n# about b\nb: 2\nc:\n  - x\nd3: 4\n"
    assert uncommented_keys(text) == [(4, "c:"), (6, "d3: 4")]


def test_every_config_key_has_a_comment():
    files = sorted(CONFIGS.rglob("*.yaml"))
    assert files, f"no YAML files under {CONFIGS}"
    offenders = [f"{path.relative_to(CONFIGS.parent)}:{n}: {line.strip()}"
                 for path in files for n, line in uncommented_keys(path.read_text())]
    assert not offenders, (f"{len(offenders)} config keys have no comment (add a short trailing `# what it does / why`, "
                           "aligned with the file's other comments):\n" + "\n".join(offenders))
