"""The part cache of a scoring run: each part of `part_size` records is scored and written atomically as
`<output stem>.parts/part-NNNNN.json`; a fingerprint of everything that changes the scores guards the cache; the
final file is merged from the parts in input order, with its `.meta.json` sidecar."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedder.atomic import read_json, write_json
from embedder.data.jsonl import write_jsonl_atomic
from embedder.data.records import candidate_list
from embedder.errors import DataError
from embedder.progress import Progress
from embedder.provenance import code_provenance
from embedder.scoring.records import FilePlan, choose_answers, iter_raw_lines, trim_record
from embedder.scoring.settings import ScoreSettings, build_scorer
from embedder.scoring.templates import build_templates

log = logging.getLogger(__name__)


PART_FORMAT = 1  # bump when the part file layout changes, so old caches are not mixed in


@dataclass
class FileJob:
    """One input file: its plan, where it goes, and the fingerprint its cached parts must match."""

    plan: FilePlan
    output: str
    meta: str
    parts_dir: str
    n_parts: int
    fingerprint: dict[str, Any]
    status: str = "todo"  # todo | done (already scored with the same settings)
    stats: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class PartTask:
    """One part to score: records [start, end) of file `path` (picklable)."""

    file_index: int
    part: int
    start: int
    end: int


def file_fingerprint(plan: FilePlan, s: ScoreSettings, templates: dict[str, Any]) -> dict[str, Any]:
    """Everything that changes the scores; a cache made with another fingerprint is never reused."""
    lm = {k: s.lm.get(k) for k in ("name", "model_name_or_path", "gguf_file", "revision", "dtype", "max_length")}
    return {"format": PART_FORMAT, "input": os.path.abspath(plan.path), "input_sha256": plan.sha256,
            "records": plan.records, "part_size": s.part_size, "lm": lm,
            "templates": {t: templates[t].describe() for t in sorted(plan.tasks)}, "task": s.task,
            "normalize": s.normalize, "answer_choice": s.answer_choice, "seed": s.seed,
            "key_max_length": s.key_max_length, "max_candidates": s.max_candidates,
            "skipped_lines": sorted(plan.skipped)}


def _read_cached(path: str) -> Any:
    return read_json(path, "cache or sidecar file",
                     "delete it and run again: a part is rescored, a sidecar or fingerprint rewritten")


def part_path(job: FileJob, part: int) -> str:
    return os.path.join(job.parts_dir, f"part-{part:05d}-of-{job.n_parts:05d}.json")


def check_existing(job: FileJob, s: ScoreSettings) -> None:
    """Skip a file already scored with the same settings; never mix a stale part cache into a new run."""
    fp_path = os.path.join(job.parts_dir, "fingerprint.json")
    if os.path.exists(job.output) and not s.overwrite:
        old = _read_cached(job.meta) if os.path.exists(job.meta) else None
        if old is not None and old.get("fingerprint") == job.fingerprint:
            job.status = "done"
            log.info("%s is already scored with these settings; skipping (overwrite=true to redo)", job.output)
            return
        complete = all(os.path.exists(part_path(job, k)) for k in range(job.n_parts))
        if os.path.exists(fp_path) and complete and _read_cached(fp_path) == job.fingerprint:
            # killed between writing the scored file and its sidecar: every part is cached, so merge again
            log.info("%s: finishing an interrupted merge from the cached parts", job.output)
            return
        raise FileExistsError(f"{job.output} exists but was scored with other settings or has no {job.meta}; "
                              f"pass overwrite=true to replace it, or another save_name")
    if os.path.exists(fp_path):
        if _read_cached(fp_path) == job.fingerprint and not s.overwrite:
            return
        if not s.overwrite:
            raise FileExistsError(f"{job.parts_dir} holds parts scored with other settings (model, template, input "
                                  f"or part_size changed); pass overwrite=true to discard them, or delete the folder")
        shutil.rmtree(job.parts_dir)
    write_json(fp_path, job.fingerprint, indent=1)


def iter_part_records(path: str, tasks: list[PartTask], skipped: dict[int, str]
                       ) -> Iterator[tuple[PartTask, list[tuple[int, dict]]]]:
    """Stream one file once, yielding each requested part's (line, record) list in file order, bad records
    (`skipped` lines) left out."""
    tasks = sorted(tasks, key=lambda t: t.start)
    if not tasks:
        return
    ti, buf = 0, []
    for index, (line, raw) in enumerate(iter_raw_lines(path)):
        t = tasks[ti]
        if index < t.start:
            continue
        if line not in skipped:
            buf.append((line, json.loads(raw)))
        if index == t.end - 1:
            yield t, buf
            ti, buf = ti + 1, []
            if ti == len(tasks):
                return


def score_parts(s: ScoreSettings, jobs: list[FileJob], tasks: list[PartTask]) -> None:
    """Score and cache the given parts (loads the model only if there is work)."""
    if not tasks:
        return
    from embedder.scoring.lm_scorer import Job

    templates = build_templates(s.templates)
    scorer = build_scorer(s)
    describe = scorer.describe()
    by_file: dict[int, list[PartTask]] = {}
    for t in tasks:
        by_file.setdefault(t.file_index, []).append(t)
    done = 0
    progress = Progress("scoring", sum(t.end - t.start for t in tasks), unit="records", logger=log)
    for fi, ftasks in by_file.items():
        job = jobs[fi]
        for task, rows in iter_part_records(job.plan.path, ftasks, job.plan.skipped):
            t0 = time.perf_counter()
            before = Counter(scorer.stats)
            lm_jobs, shape = [], []
            for offset, (line, record) in enumerate(rows):
                record, _ = trim_record(record, s.max_candidates)
                template = templates[record.get("task", s.task)]
                answers = choose_answers(record["answers"], s.answer_choice, s.seed, task.start + offset)
                keys = candidate_list(record)
                shape.append((len(keys), len(answers)))
                lm_jobs.extend(Job(template, record, key, ans) for key in keys for ans in answers)
            # progress in records, advanced batch by batch inside the part (a part can take minutes on a CPU)
            per_input = (task.end - task.start) / max(len(lm_jobs), 1)
            flat = scorer.score(lm_jobs, lambda n: progress.update(n * per_input)) if lm_jobs else np.zeros(0)
            scores, i = [], 0
            for n_keys, n_ans in shape:
                block = flat[i: i + n_keys * n_ans].reshape(n_keys, n_ans).mean(axis=1)
                scores.append([round(float(x), 6) for x in block])
                i += n_keys * n_ans
            seconds = time.perf_counter() - t0
            stats = dict(Counter(scorer.stats) - before)
            write_json(part_path(job, task.part), {
                "format": PART_FORMAT, "part": task.part, "start": task.start, "end": task.end,
                "lines": [line for line, _ in rows], "teacher_scores": scores, "stats": stats,
                "seconds": round(seconds, 3), "scorer": describe}, indent=1)
            done += 1
            if not lm_jobs:
                progress.update(task.end - task.start)
            log.info("%s part %d/%d: %d records, %d LM inputs, %d tokens in %.1f s (%.1f inputs/s) [%d/%d parts here]",
                     job.plan.path, task.part + 1, job.n_parts, len(rows), len(lm_jobs),
                     stats.get("tokens", 0), seconds, len(lm_jobs) / max(seconds, 1e-9), done, len(tasks))
    progress.finish()


def merge(job: FileJob, s: ScoreSettings) -> None:
    """Write the scored file (input order, atomically) and its meta sidecar; then drop the part cache."""
    stats: Counter = Counter()
    seconds = 0.0
    scorer: dict[str, Any] = {}

    def parts() -> Iterator[tuple[int, list[float]]]:
        nonlocal seconds, scorer
        for k in range(job.n_parts):
            part = _read_cached(part_path(job, k))
            if part.get("format") != PART_FORMAT or part["start"] != k * s.part_size:
                raise ValueError(f"{part_path(job, k)} does not match this run; delete {job.parts_dir} and rerun")
            stats.update(part["stats"])
            seconds += part["seconds"]
            scorer = scorer or part["scorer"]
            yield from zip(part["lines"], part["teacher_scores"])

    def records() -> Iterator[dict[str, Any]]:
        scored = parts()
        for index, (line, raw) in enumerate(iter_raw_lines(job.plan.path)):
            if index >= job.plan.records:
                break
            if line in job.plan.skipped:
                continue
            part_line, scores = next(scored)
            if part_line != line:
                raise DataError(f"cached part is out of step with the input (part says line {part_line})",
                                path=job.plan.path, line=line, hint=f"delete {job.parts_dir} and rerun")
            record, _ = trim_record(json.loads(raw), s.max_candidates)
            if len(scores) != len(candidate_list(record)):
                raise DataError(f"{len(scores)} scores for {len(candidate_list(record))} candidates in the cache",
                                path=job.plan.path, line=line, hint=f"delete {job.parts_dir} and rerun")
            record["teacher_scores"] = scores
            yield record

    n = write_jsonl_atomic(job.output, records())
    job.stats = stats
    p = job.plan
    meta = {
        "output": os.path.basename(job.output), "input": os.path.abspath(p.path), "input_sha256": p.sha256,
        "records": n, "input_records": p.total_records, "skipped_bad_records": len(p.skipped),
        "skipped_examples": {str(k): v for k, v in list(p.skipped.items())[:10]}, "candidates": p.candidates, "lm_inputs": p.pairs,
        "candidates_per_record": {"min": p.min_candidates, "max": p.max_candidates},
        "aligned_with": "history (chat) or pos + neg", "tasks": dict(p.tasks),
        "scorer": scorer, "templates": job.fingerprint["templates"],
        "normalize": s.normalize,
        "score": ("mean per-token log-likelihood of the answer tokens" if s.normalize == "mean"
                  else "summed log-likelihood of the answer tokens") + ", log p(answer | key, query); no softmax",
        "answer_choice": s.answer_choice, "seed": s.seed, "key_max_length": s.key_max_length,
        "max_candidates": s.max_candidates, "max_records": s.max_records,
        "records_with_candidates_cut": p.trimmed, "replaced_teacher_scores": p.replaced_scores,
        "truncation": {k: stats.get(k, 0) for k in ("keys_truncated", "context_truncated", "context_cut_left",
                                                     "answers_truncated")},
        "tokens": stats.get("tokens", 0), "answer_tokens": stats.get("answer_tokens", 0),
        "compute_seconds": round(seconds, 1), "parts": job.n_parts,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **code_provenance(("embedder", "torch", "transformers")),
        "fingerprint": job.fingerprint,
    }
    write_json(job.meta, meta, indent=1)
    if not s.keep_parts:
        shutil.rmtree(job.parts_dir, ignore_errors=True)
    t = meta["truncation"]
    if t["context_truncated"] or t["keys_truncated"]:
        log.warning("%s: %d keys cut to key_max_length=%s; %d prompts over the context shortened from the knowledge "
                    "side (%d also cut from the left)", job.output, t["keys_truncated"], s.key_max_length,
                    t["context_truncated"], t["context_cut_left"])
    log.info("wrote %s (%d records) and %s", job.output, n, job.meta)
