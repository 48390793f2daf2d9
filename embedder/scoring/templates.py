"""Per-task LM-scoring prompts: a format string in config, rendered with exact character spans.

A template is a Python format string over `{key}` (the candidate passage, turn or chunk), `{query}`, `{answer}` (the
scored output) and any other string field of the record, e.g. `{context}` for lrlm. Unlike the reference, which
`eval`s f-strings, fields are plain names, `{answer}` must come last, and rendering records where the key and the
answer sit in the text, so the scorer can mark the answer tokens exactly and shorten the key when a prompt is too long.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any

KEY, ANSWER = "key", "answer"


@dataclass(frozen=True)
class Rendered:
    """One prompt + answer text; `key_span` and `answer_start` are character offsets into `text`."""

    text: str
    key_span: tuple[int, int]
    answer_start: int


@dataclass(frozen=True)
class Template:
    """A parsed template. `fields` lists the record fields it reads besides key and answer (query, context, ...)."""

    task: str
    text: str
    strip: bool = False
    defaults: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        pieces = self.pieces  # validates
        names = [name for _, name in pieces if name is not None]
        for required in (KEY, ANSWER):
            if names.count(required) != 1:
                raise ValueError(f"template for task {self.task!r} must use {{{required}}} exactly once: {self.text!r}")
        if pieces[-1][1] != ANSWER:
            raise ValueError(f"template for task {self.task!r} must end with {{answer}} (the scored tokens are the "
                             f"end of the text): {self.text!r}")

    @property
    def pieces(self) -> list[tuple[str, str | None]]:
        """[(literal text, field name or None), ...] in order."""
        out = []
        try:
            parsed = list(string.Formatter().parse(self.text))
        except ValueError as e:
            raise ValueError(f"template for task {self.task!r} is not a valid format string ({e}): {self.text!r}") from None
        for literal, name, spec, conv in parsed:
            if name is not None and (spec or conv or not name.isidentifier()):
                raise ValueError(f"template for task {self.task!r}: use plain fields like {{query}}, "
                                 f"not {{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}")
            out.append((literal, name or None))
        if out and out[-1][1] is None and out[-1][0] == "":
            out.pop()
        return out

    @property
    def fields(self) -> list[str]:
        """Record fields the template reads (besides the key and the answer)."""
        return [name for _, name in self.pieces if name not in (None, KEY, ANSWER)]

    def missing_fields(self, record: dict[str, Any]) -> list[str]:
        """Fields the record lacks (or has as a non-string) and that have no default."""
        return [f for f in self.fields if not isinstance(record.get(f), str) and f not in self.defaults]

    def render(self, record: dict[str, Any], key: str, answer: str) -> Rendered:
        """Fill the template for one (record, key, answer)."""
        parts: list[str] = []
        pos = 0
        key_span = (0, 0)
        answer_start = 0
        for literal, name in self.pieces:
            parts.append(literal)
            pos += len(literal)
            if name is None:
                continue
            if name == KEY:
                value = key
            elif name == ANSWER:
                value = answer
            else:
                value = record.get(name)
                if not isinstance(value, str):
                    value = self.defaults[name]
            if self.strip:
                value = value.strip()
            if name == KEY:
                key_span = (pos, pos + len(value))
            elif name == ANSWER:
                answer_start = pos
            parts.append(value)
            pos += len(value)
        return Rendered("".join(parts), key_span, answer_start)

    def describe(self) -> dict[str, Any]:
        return {"text": self.text, "strip": self.strip, "defaults": dict(self.defaults)}


def build_templates(spec: dict[str, Any] | None) -> dict[str, Template]:
    """`{task: {text, strip, defaults}}` from config -> parsed templates (a null entry removes a task)."""
    out: dict[str, Template] = {}
    for task, entry in (spec or {}).items():
        if entry is None:
            continue
        if isinstance(entry, str):
            entry = {"text": entry}
        unknown = set(entry) - {"text", "strip", "defaults"}
        if unknown:
            raise ValueError(f"templates.{task}: unknown keys {sorted(unknown)}; allowed: text, strip, defaults")
        if not entry.get("text"):
            raise ValueError(f"templates.{task}.text is empty")
        out[task] = Template(task=task, text=entry["text"], strip=bool(entry.get("strip", False)),
                             defaults=dict(entry.get("defaults") or {}))
    return out
