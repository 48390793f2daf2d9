"""The data contract: what every kind of record must hold, checked in one place.

Four kinds of JSON record enter embedder, and each is checked here, field by field, with a `DataError` that names
the file, the line and the field:

- **training** records (`check_train_record`): `query`, candidates (`pos`/`neg`, or `history` for chat),
  optional `teacher_scores` aligned one-to-one with the candidates;
- **query** records for evaluation and mining (`check_query_record`): `query`, optional `query_id`/`qid`,
  `pos_index` (relevant corpus rows), `pos` (texts), `answers`, and `key`/`key_index` for rerank evaluation;
- **scoring** records for `score.py` (`check_scoring_record`): a training record plus `answers` and a `task` with
  an LM template;
- **corpus** records (`format_key`, `key_fields`): any object whose fields the corpus `key_template` reads.

There is one `candidates()` (what a record's keys are, in the order `teacher_scores` follows) and one corpus-text
formatter (`format_key`). The readers (`train_files`, `corpus`, mining, evaluation and scoring inputs) only decide
whether a bad record stops the run or is skipped and counted (`SkipCounter`).

Numbers must be finite: Python's `json` reads `NaN` and `Infinity`, and one NaN teacher score poisons a run.
"""

from __future__ import annotations

import logging
import math
import string
from collections import Counter
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from embedder.errors import DataError

log = logging.getLogger(__name__)

ID_FIELDS = ("id", "_id", "docid")  # a corpus record's own id, when it has one (must then be unique)
_SHOW_SKIPPED = 5  # skipped records logged one by one before the log only counts them


# ---------------------------------------------------------------------------------------------------------------------
# candidates and corpus text
# ---------------------------------------------------------------------------------------------------------------------

def candidates(record: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """`(pos, neg)` of a record. Chat records keep their candidates in `history` (all of them count as negatives).

    `teacher_scores` align with `pos + neg` (or `history`), in that order.
    """
    if record.get("history") is not None:
        return [], list(record["history"])
    return list(record.get("pos") or []), list(record.get("neg") or [])


def candidate_list(record: Mapping[str, Any]) -> list[str]:
    """`pos + neg` (or `history`) in one list: the keys `teacher_scores` score, in their order."""
    pos, neg = candidates(record)
    return pos + neg


def candidate_field(record: Mapping[str, Any]) -> str:
    """The name of the field(s) that hold a record's candidates, for messages."""
    return "history" if record.get("history") is not None else "pos + neg"


def key_fields(key_template: str) -> list[str]:
    """The record fields `key_template` reads, e.g. `"{title} {text}"` -> `["title", "text"]`."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(key_template) if f is not None]
    except ValueError as e:
        raise ValueError(f"key_template {key_template!r} is not a valid format string: {e}") from None
    out = []
    for name in names:
        base = name.split(".")[0].split("[")[0]
        if not base or base.isdigit():
            raise ValueError(f"key_template {key_template!r}: use named fields such as {{text}}, not {{{name}}}")
        if base not in out:
            out.append(base)
    return out


def format_key(record: Mapping[str, Any], key_template: str, path: str | None = None,
               line: int | None = None, defaults: Mapping[str, str] | None = None) -> str:
    """A corpus record's text: `key_template.format(**record)` (null fields read as ""), with a DataError naming
    the missing field. `defaults` fills fields a record may leave out (BEIR's optional `title`)."""
    if not isinstance(record, Mapping):
        raise DataError(f"corpus record must be a JSON object, got {type(record).__name__}", path=path, line=line,
                        hint="one JSON object per line, e.g. {\"title\": ..., \"text\": ...}")
    try:
        return key_template.format(**{**(defaults or {}), **{k: ("" if v is None else v) for k, v in record.items()}})
    except KeyError as e:
        name = e.args[0]
        raise DataError(f"corpus record has no field '{name}', which key_template {key_template!r} needs "
                        f"(fields present: {sorted(record)})", path=path, line=line, field=name,
                        hint="set key_template to the corpus's fields, e.g. key_template='{text}'") from None
    except (IndexError, ValueError) as e:
        raise ValueError(f"key_template {key_template!r} is not a valid format string: {e}") from None


# ---------------------------------------------------------------------------------------------------------------------
# field checks shared by every kind
# ---------------------------------------------------------------------------------------------------------------------

def _fail(message: str, reason: str, **kw: Any) -> DataError:
    err = DataError(message, **kw)
    err.reason = reason  # type: ignore[attr-defined]  # the SkipCounter groups skipped records by it
    return err


def check_query_text(record: Mapping[str, Any], path: str | None, line: int | None, allow_empty: bool = True) -> str:
    query = record.get("query")
    if not isinstance(query, str) or (not allow_empty and not query.strip()):
        problem = "missing 'query'" if query is None else "query is empty" if isinstance(query, str) else \
            f"'query' must be a string, got {type(query).__name__}"
        raise _fail(problem, "empty query" if isinstance(query, str) or query is None else "malformed query",
                    path=path, line=line, field="query", hint="every record needs a non-empty 'query' string")
    return query


def check_str_list(record: Mapping[str, Any], name: str, path: str | None, line: int | None) -> list[str] | None:
    val = record.get(name)
    if val is None:
        return None
    if not (isinstance(val, list) and all(isinstance(x, str) for x in val)):
        raise _fail(f"'{name}' must be a list of strings", f"malformed {name}", path=path, line=line, field=name)
    return val


def check_int_list(value: Any, name: str, path: str | None, line: int | None) -> list[int]:
    values = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise _fail(f"{name} must be a list of integers, got {value!r}"[:200], f"malformed {name}", path=path,
                    line=line, field=name)
    return values


def check_numbers(value: Any, name: str, path: str | None, line: int | None) -> list[float]:
    """A list of finite numbers (NaN and Infinity, which Python's json accepts, are refused)."""
    if not isinstance(value, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise _fail(f"'{name}' must be a list of numbers", f"malformed {name}", path=path, line=line, field=name)
    bad = [i for i, x in enumerate(value) if not math.isfinite(x)]
    if bad:
        raise _fail(f"'{name}' holds a non-finite number ({value[bad[0]]!r} at position {bad[0]}; {len(bad)} in all)",
                    f"non-finite {name}", path=path, line=line, field=name,
                    hint="NaN/Infinity would poison training; re-run the scorer on this record, or delete it")
    return value


# ---------------------------------------------------------------------------------------------------------------------
# training records
# ---------------------------------------------------------------------------------------------------------------------

def check_train_record(record: Mapping[str, Any], path: str, line: int, settings: Any) -> None:
    """Raise DataError for a training record the recipe cannot use. `settings` is the record's `RecordKind`."""
    check_query_text(record, path, line)
    for key in ("pos", "neg", "history"):
        check_str_list(record, key, path, line)
    pos, neg = candidates(record)
    if not pos and not neg:
        what = "'history' is empty" if record.get("history") is not None else "'pos' and 'neg' are both empty"
        raise DataError(what, path=path, line=line, field="history" if record.get("history") is not None else "pos",
                        hint="give at least one positive or negative key (or delete the record)")
    scores = record.get("teacher_scores")
    if scores is not None:
        check_numbers(scores, "teacher_scores", path, line)
        aligned = candidate_field(record)
        if len(scores) != len(pos) + len(neg):
            raise DataError(f"{len(scores)} teacher_scores for {len(pos) + len(neg)} keys in {aligned}",
                            path=path, line=line, field="teacher_scores",
                            hint=f"teacher_scores must align one-to-one with {aligned}; re-run score.py on this file")
    if settings.needs_teacher_scores and not scores:
        teacher = [s.target.rsplit(".", 1)[-1] for s in settings.losses]
        raise DataError(
            f"record kind '{settings.name}' enables distillation ({', '.join(teacher)}: it needs teacher scores) "
            f"but this record has no teacher_scores", path=path, line=line, field="teacher_scores",
            hint=f"run score.py on this file to add teacher scores, or train it contrastively: "
                 f"record_kinds.{settings.name}.losses=[{{_target_:embedder.losses.InfoNCELoss,weight:1.0}}]")
    if settings.sampling.select_positive == "random" and not pos:
        raise DataError("select_positive=random needs at least one positive", path=path, line=line, field="pos")


def record_task(record: Mapping[str, Any], default_task: str | None, path: str, line: int,
                valid: Mapping[str, Any] | None = None, hint_default: str = "") -> str:
    """The record's `task` (or the default), checked against the valid names when given."""
    task = record.get("task", default_task)
    if task is None:
        raise DataError("record has no 'task', and no default is set", path=path, line=line, field="task",
                        hint=hint_default or (f"add \"task\": one of {sorted(valid)} to the records" if valid else
                                              "add \"task\" to the records"))
    if not isinstance(task, str):
        raise DataError(f"'task' must be a string, got {type(task).__name__}", path=path, line=line, field="task")
    if valid is not None and task not in valid:
        raise DataError(f"unknown task {task!r}", path=path, line=line, field="task",
                        hint=f"valid tasks: {', '.join(sorted(valid))}; add record_kinds.{task} in a task config to define it")
    return task


# ---------------------------------------------------------------------------------------------------------------------
# query records (evaluation and mining)
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class QueryRecord:
    """A checked query record: the parsed fields, and the record itself (mining writes it back out)."""

    line: int
    row: int  # 0-based position among all records of the file (the reference's default query id)
    record: dict[str, Any]
    query: str
    pos_index: list[int] = field(default_factory=list)
    pos: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    has_labels: bool = False  # the record has `pos_index` (the label-based metrics need it)
    has_answers: bool = False  # the record has `answers` (answer recall needs it)
    keys: list[str] | None = None  # rerank candidates (`key`)
    key_index: list[int] | None = None  # their corpus rows (`key_index`)
    pos_relevance: list[float] | None = None  # graded qrels: the grade of each `pos_index` row (BEIR's scores)

    @property
    def query_id(self) -> Hashable:
        return self.record.get("query_id", self.record.get("qid", self.row))


def check_query_record(rec: Any, path: str | None, line: int, row: int, corpus_size: int | None = None,
                       rerank: bool = False) -> QueryRecord:
    """Check one eval or mining query record. `corpus_size` bounds `pos_index` (rerank mode without `key_index`:
    the record's own `key` list bounds it)."""
    if not isinstance(rec, dict):
        raise _fail(f"query record must be a JSON object, got {type(rec).__name__}", "not an object", path=path,
                    line=line)
    qid = rec.get("query_id", rec.get("qid", row))
    if isinstance(qid, (list, dict)):
        raise _fail("query id must be a string or an int", "malformed query_id", path=path, line=line,
                    field="query_id")
    text = check_query_text(rec, path, line, allow_empty=False)
    keys = key_index = None
    if rerank:
        keys = rec.get("key")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise _fail("rerank mode needs a list of candidate texts", "malformed key", path=path, line=line,
                        field="key")
        if rec.get("key_index") is not None:
            key_index = check_int_list(rec["key_index"], "key_index", path, line)
            if len(key_index) != len(keys):
                raise _fail(f"key_index has {len(key_index)} entries but key has {len(keys)}", "malformed key_index",
                            path=path, line=line, field="key_index")
    pos_index = rec.get("pos_index")
    has_labels = pos_index is not None
    pos_index = [] if pos_index is None else check_int_list(pos_index, "pos_index", path, line)
    if rerank and key_index is None:
        limit, where = len(keys), f"the record's {len(keys)} 'key' candidates"
    else:
        limit, where = corpus_size, f"the corpus ({corpus_size} documents, rows 0..{(corpus_size or 0) - 1})"
    bad = [i for i in pos_index if i < 0 or (limit is not None and i >= limit)]
    if bad:
        raise _fail(f"pos_index {bad} outside {where}", "pos_index outside the corpus", path=path, line=line,
                    field="pos_index", hint="pos_index holds 0-based row numbers of the corpus file; check that "
                                            "the two files belong together")
    relevance = rec.get("pos_relevance")
    if relevance is not None:
        if not (isinstance(relevance, list) and all(isinstance(g, (int, float)) and not isinstance(g, bool)
                                                    for g in relevance)):
            raise _fail("pos_relevance must be a list of numbers (the grade of each pos_index row)",
                        "malformed pos_relevance", path=path, line=line, field="pos_relevance")
        if len(relevance) != len(pos_index):
            raise _fail(f"pos_relevance has {len(relevance)} grades but pos_index {len(pos_index)} rows",
                        "malformed pos_relevance", path=path, line=line, field="pos_relevance",
                        hint="give one grade per pos_index row, in the same order")
    pos = check_str_list(rec, "pos", path, line) or []
    answers = rec.get("answers")
    has_answers = answers is not None
    if isinstance(answers, str):
        answers = [answers]
    if answers is not None and not (isinstance(answers, list) and all(isinstance(a, str) for a in answers)):
        raise _fail("answers must be a list of strings", "malformed answers", path=path, line=line, field="answers")
    return QueryRecord(line=line, row=row, record=rec, query=text, pos_index=list(pos_index), pos=list(pos),
                       answers=list(answers or []), has_labels=has_labels, has_answers=has_answers, keys=keys,
                       key_index=key_index, pos_relevance=None if relevance is None else [float(g) for g in relevance])


# ---------------------------------------------------------------------------------------------------------------------
# scoring records
# ---------------------------------------------------------------------------------------------------------------------

def check_scoring_record(record: Mapping[str, Any], path: str, line: int, templates: Mapping[str, Any],
                         default_task: str | None) -> str:
    """Raise DataError (file, line, field) for a record that cannot be LM-scored; return its task.

    `templates` maps a task to its LM template (anything with `missing_fields(record) -> [names]`).
    """
    task = record_task(record, default_task, path, line,
                       hint_default="add \"task\" to the records, or pass default_record_kind=<qa|convsearch|icl|chat|lrlm> "
                                    "to score.py")
    template = templates.get(task)
    if template is None:
        raise DataError(f"task {task!r} has no LM-scoring template", path=path, line=line, field="task",
                        hint=f"templates exist for: {', '.join(sorted(templates)) or 'none'}. Add one in config, e.g. "
                             f"'+templates.{task}.text=\"{{key}}\\n{{query}}\\n{{answer}}\"' or a file under "
                             f"configs/templates/, or leave this task out of the files you score")
    query = record.get("query")
    if not isinstance(query, str):
        raise DataError("missing 'query'" if query is None else f"'query' must be a string, got {type(query).__name__}",
                        path=path, line=line, field="query", hint="every scored record needs a query string")
    answers = record.get("answers")
    if answers is None:
        raise DataError("missing 'answers' (the output whose likelihood the LM scores)", path=path, line=line,
                        field="answers", hint="add \"answers\": [\"...\"]; LM scoring computes log p(answer | key, query)")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise DataError("'answers' must be a non-empty list of strings", path=path, line=line, field="answers")
    if not all(a.strip() for a in answers):
        raise DataError("'answers' holds an empty answer", path=path, line=line, field="answers",
                        hint="an empty output has no tokens to score; drop it or the record")
    for name in (("history",) if record.get("history") is not None else ("pos", "neg")):
        check_str_list(record, name, path, line)
    pos, neg = candidates(record)
    if not pos and not neg:
        what = candidate_field(record)
        raise DataError(f"no candidates to score: '{what}' is empty", path=path, line=line,
                        field="history" if what == "history" else "pos",
                        hint="give at least one key to score (pos/neg, or history for chat), or delete the record")
    missing = template.missing_fields(record)
    if missing:
        raise DataError(f"the {task!r} template reads {{{missing[0]}}} but the record has no such string field",
                        path=path, line=line, field=missing[0],
                        hint=f"add the field, or give it a default: templates.{task}.defaults.{missing[0]}=''")
    return task


# ---------------------------------------------------------------------------------------------------------------------
# stop or skip
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class SkipCounter:
    """Bad records skipped instead of stopping the run: counted by reason, the first few logged with their line."""

    path: str | None = None
    skipped: Counter = field(default_factory=Counter)

    def skip(self, error: DataError) -> None:
        self.skipped[getattr(error, "reason", "bad record")] += 1
        if sum(self.skipped.values()) <= _SHOW_SKIPPED:
            log.warning("skipped: %s", str(error).splitlines()[0])

    @property
    def total(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        return ", ".join(f"{n} {why}" for why, n in self.skipped.most_common()) or "none"
