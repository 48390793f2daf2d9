"""`run_score(cfg)`: everything `score.py` does, callable from tests with a composed config.

The flow, per input file:
1. Validate every record and count the work (no model yet): a bad record or a task without a template stops here.
2. Split the records into parts of `part_size`; each part is scored and cached as `<output stem>.parts/part-NNNNN.json`
   (atomic write). A rerun skips cached parts, so a crash costs at most one part per worker. Parts are split over
   `num_shards` jobs (contiguously) and, within a job, over `devices` worker processes or torchrun ranks.
3. When every part exists, the final file is written atomically: each input record unchanged (except candidate lists
   cut by `max_candidates`) plus `teacher_scores`, in input order, with a `.meta.json` sidecar (scorer, revision,
   template, normalisation, counts, truncation, date, git SHA). The result does not depend on how the work was split.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from embedder.data.jsonl import atomic_open, write_jsonl_atomic
from embedder.data.records import candidate_list
from embedder.errors import DataError
from embedder.paths import resolve_files
from embedder.progress import Progress
from embedder.scoring.records import FilePlan, choose_answers, iter_raw_lines, plan_file, trim_record
from embedder.scoring.templates import build_templates

log = logging.getLogger(__name__)

PART_FORMAT = 1  # bump when the part file layout changes, so old caches are not mixed in
LM_KEYS = ("name", "model_name_or_path", "gguf_file", "revision", "dtype", "device", "device_map",
           "attn_implementation", "trust_remote_code", "max_length", "tiny_dir")


@dataclass
class ScoreSettings:
    """The resolved, plain settings of one scoring run (picklable, for worker processes)."""

    files: list[str]
    lm: dict[str, Any]
    templates: dict[str, Any]
    save_name: str
    output_dir: str | None = None
    data_root: str | None = None
    task: str | None = None
    seed: int = 42
    normalize: str = "mean"
    answer_choice: str = "seeded"
    key_max_length: int | None = 512
    max_candidates: int | None = None
    max_records: int | None = None
    batch_size: int = 16
    max_tokens_per_batch: int | None = 16384
    packed: str = "auto"
    skip_bad_records: bool = False
    part_size: int = 256
    num_shards: int = 1
    shard_id: int = 0
    devices: int = 1
    keep_parts: bool = False
    overwrite: bool = False
    dry_run: bool = False
    merge_poll_s: float = 5.0


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


# ------------------------------------------------------------------------------------------------------------ config
def settings_from_cfg(cfg: DictConfig) -> ScoreSettings:
    """Resolve the Hydra config into ScoreSettings; `eval_data: null` means the bundled sample (cfg.sample)."""
    from embedder.bundled import register_resolvers

    register_resolvers()
    c = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
         for k, v in ((k, cfg[k]) for k in cfg if k != "hydra")}  # the hydra node needs a running job to resolve
    sample = c.get("sample") or {}
    use_sample = c.get("eval_data") is None
    data_root = sample.get("data_root") if use_sample else c.get("data_root")
    raw_files = sample.get("files") if use_sample else c["eval_data"]
    if not raw_files:
        raise ValueError("nothing to score: set eval_data=<file or glob> (and data_root for `llm-embedder:` paths)")
    files = resolve_files(raw_files, data_root, what="eval_data")
    pick = (lambda k: c.get(k) if c.get(k) is not None else sample.get(k)) if use_sample else c.get
    lm = {k: v for k, v in (c.get("lm") or {}).items() if k in LM_KEYS}
    unknown = set(c.get("lm") or {}) - set(LM_KEYS)
    if unknown:
        raise ValueError(f"lm config has unknown keys {sorted(unknown)}; allowed: {', '.join(LM_KEYS)}")
    if not lm.get("model_name_or_path"):
        raise ValueError("lm.model_name_or_path is not set; pick an lm config, e.g. lm=smollm2 or lm=llama2-7b-chat")
    s = ScoreSettings(
        files=files, lm=lm, templates=c.get("templates") or {}, save_name=str(c.get("save_name") or lm.get("name")),
        output_dir=pick("output_dir"), data_root=data_root, task=c.get("default_task"), seed=int(c.get("seed", 42)),
        normalize=c.get("normalize", "mean"), answer_choice=c.get("answer_choice", "seeded"),
        key_max_length=c.get("key_max_length"), max_candidates=pick("max_candidates"), max_records=pick("max_records"),
        batch_size=int(c.get("batch_size", 16)), max_tokens_per_batch=c.get("max_tokens_per_batch"),
        packed=str(c.get("packed", "auto")).lower(), skip_bad_records=bool(c.get("skip_bad_records", False)),
        part_size=int(c.get("part_size", 256)), num_shards=int(c.get("num_shards", 1)),
        shard_id=int(c.get("shard_id", 0)), devices=int(c.get("devices", 1)), keep_parts=bool(c.get("keep_parts")),
        overwrite=bool(c.get("overwrite")), dry_run=bool(c.get("dry_run")))
    if s.part_size < 1:
        raise ValueError(f"part_size must be >= 1, got {s.part_size}")
    if not 0 <= s.shard_id < s.num_shards:
        raise ValueError(f"shard_id={s.shard_id} must be in [0, num_shards={s.num_shards})")
    if s.devices < 1:
        raise ValueError(f"devices must be >= 1, got {s.devices}")
    if s.max_records is not None and s.max_records < 1:
        raise ValueError(f"max_records must be >= 1 (or null for all), got {s.max_records}")
    from embedder.scoring.lm_scorer import NORMALIZE

    if s.normalize not in NORMALIZE:
        raise ValueError(f"normalize={s.normalize!r}; valid: {', '.join(NORMALIZE)}")
    if "/" in s.save_name or not s.save_name:
        raise ValueError(f"save_name={s.save_name!r} must be a non-empty file-name part (no '/')")
    return s


def output_paths(path: str, s: ScoreSettings) -> tuple[str, str, str]:
    """(scored file, meta sidecar, part cache folder) for one input file."""
    stem, ext = os.path.splitext(os.path.basename(path))
    folder = os.path.dirname(os.path.abspath(path))
    if s.output_dir:
        rel = ""
        if s.data_root:
            r = os.path.relpath(folder, os.path.abspath(os.path.expanduser(s.data_root)))
            rel = "" if r == "." or r.startswith("..") else r
        folder = os.path.join(s.output_dir, rel)
    base = os.path.join(folder, f"{stem}.scored.{s.save_name}")
    return base + (ext or ".json"), base + ".meta.json", base + ".parts"


def _fingerprint(plan: FilePlan, s: ScoreSettings, templates: dict[str, Any]) -> dict[str, Any]:
    """Everything that changes the scores; a cache made with another fingerprint is never reused."""
    lm = {k: s.lm.get(k) for k in ("name", "model_name_or_path", "gguf_file", "revision", "dtype", "max_length")}
    return {"format": PART_FORMAT, "input": os.path.abspath(plan.path), "input_sha256": plan.sha256,
            "records": plan.records, "part_size": s.part_size, "lm": lm,
            "templates": {t: templates[t].describe() for t in sorted(plan.tasks)}, "task": s.task,
            "normalize": s.normalize, "answer_choice": s.answer_choice, "seed": s.seed,
            "key_max_length": s.key_max_length, "max_candidates": s.max_candidates,
            "skipped_lines": sorted(plan.skipped)}


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:  # a 0-byte or cut file (disk full, a killed copy)
        raise DataError(f"corrupt cache or sidecar file ({e})", path=path,
                        hint="delete it and run again: a part is rescored, a sidecar or fingerprint rewritten") from None


def _write_json_atomic(path: str, obj: Any) -> None:
    with atomic_open(path, suffix=".json") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)


def _part_path(job: FileJob, part: int) -> str:
    return os.path.join(job.parts_dir, f"part-{part:05d}-of-{job.n_parts:05d}.json")


# ------------------------------------------------------------------------------------------------------------ run
def run_score(cfg: DictConfig) -> dict[str, Any]:
    """Score every file in the config. Returns {"files": [{input, output, status, records, pairs, ...}]}."""
    s = settings_from_cfg(cfg)
    return score_files(s)


def score_files(s: ScoreSettings) -> dict[str, Any]:
    templates = build_templates(s.templates)
    t0 = time.perf_counter()
    # 1. Validate everything before any model is loaded.
    jobs = []
    seen: dict[str, str] = {}
    for path in s.files:
        plan = plan_file(path, templates, s.task, s.answer_choice, s.max_records, s.max_candidates,
                         skip_bad=s.skip_bad_records)
        if plan.skipped:
            first = next(iter(plan.skipped.items()))
            log.warning("%s: skipping %d bad records (skip_bad_records=true); they are not in the output. First: "
                        "line %d: %s", path, len(plan.skipped), *first)
        out, meta, parts = output_paths(path, s)
        if out in seen:
            raise ValueError(f"{path} and {seen[out]} would both be written to {out}; score them with different "
                             f"output_dir or save_name")
        seen[out] = path
        n_parts = max(1, -(-plan.records // s.part_size))
        jobs.append(FileJob(plan, out, meta, parts, n_parts, _fingerprint(plan, s, templates)))
    for job in jobs:
        p = job.plan
        cut = f", {p.total_records - p.records} left out by max_records" if p.records < p.total_records else ""
        log.info("%s: %d records (%s), %d candidates (%d-%d per record), %d LM inputs%s -> %s", p.path, p.records,
                 ", ".join(f"{k}: {v}" for k, v in sorted(p.tasks.items())), p.candidates, p.min_candidates or 0,
                 p.max_candidates or 0, p.pairs, cut, job.output)
    if s.dry_run:
        return _dry_run(s, jobs, templates)

    # 2. What is left to do (finished files and parts are not redone). The model must be reachable first, so a
    #    wrong name or an offline machine leaves no part cache behind.
    if any(s.overwrite or not os.path.exists(job.output) for job in jobs):
        build_scorer(s, load_model=False)
    for job in jobs:
        _check_existing(job, s)
    all_parts = [PartTask(fi, k, k * s.part_size, min((k + 1) * s.part_size, job.plan.records))
                 for fi, job in enumerate(jobs) if job.status == "todo" for k in range(job.n_parts)]
    lo, hi = s.shard_id * len(all_parts) // s.num_shards, (s.shard_id + 1) * len(all_parts) // s.num_shards
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    # torchrun: rank r owns every world-th part of this job (fixed before skipping cached parts, so ranks agree)
    assigned = all_parts[lo:hi][rank::world] if world > 1 else all_parts[lo:hi]
    mine = [t for t in assigned if not os.path.exists(_part_path(jobs[t.file_index], t.part))]
    if len(mine) < len(assigned):
        log.info("resuming: %d of %d parts are already cached", len(assigned) - len(mine), len(assigned))

    # 3. Score this job's parts: here, in `devices` spawned workers, or as one torchrun rank.
    if world > 1:
        _score_parts(s, jobs, mine)
        if rank != 0:
            return {"files": [], "rank": rank}
        _wait_for(jobs, all_parts[lo:hi], s.merge_poll_s)
    elif s.devices > 1 and len(mine) > 1:
        _spawn(s, jobs, mine)
    else:
        _score_parts(s, jobs, mine)

    # 4. Merge every file whose parts are all there.
    results = []
    for job in jobs:
        if job.status == "todo":
            missing = [k for k in range(job.n_parts) if not os.path.exists(_part_path(job, k))]
            if missing:
                job.status = "partial"
                log.info("%s: %d of %d parts still to score (other shards); rerun any shard job to finish it",
                         job.output, len(missing), job.n_parts)
            else:
                _merge(job, s)
                job.status = "scored"
        results.append({"input": job.plan.path, "output": job.output, "meta": job.meta, "status": job.status,
                        "records": job.plan.records - len(job.plan.skipped), "skipped": len(job.plan.skipped), "candidates": job.plan.candidates, "pairs": job.plan.pairs,
                        **{k: v for k, v in job.stats.items()}})
    _print_summary(results, time.perf_counter() - t0)
    return {"files": results}


def _check_existing(job: FileJob, s: ScoreSettings) -> None:
    """Skip a file already scored with the same settings; never mix a stale part cache into a new run."""
    if os.path.exists(job.output) and not s.overwrite:
        old = _read_json(job.meta) if os.path.exists(job.meta) else None
        if old is not None and old.get("fingerprint") == job.fingerprint:
            job.status = "done"
            log.info("%s is already scored with these settings; skipping (overwrite=true to redo)", job.output)
            return
        fp_path = os.path.join(job.parts_dir, "fingerprint.json")
        complete = all(os.path.exists(_part_path(job, k)) for k in range(job.n_parts))
        if os.path.exists(fp_path) and complete and _read_json(fp_path) == job.fingerprint:
            # killed between writing the scored file and its sidecar: every part is cached, so merge again
            log.info("%s: finishing an interrupted merge from the cached parts", job.output)
            return
        raise FileExistsError(f"{job.output} exists but was scored with other settings or has no {job.meta}; "
                              f"pass overwrite=true to replace it, or another save_name")
    fp_path = os.path.join(job.parts_dir, "fingerprint.json")
    if os.path.exists(fp_path):
        if _read_json(fp_path) == job.fingerprint and not s.overwrite:
            return
        if not s.overwrite:
            raise FileExistsError(f"{job.parts_dir} holds parts scored with other settings (model, template, input "
                                  f"or part_size changed); pass overwrite=true to discard them, or delete the folder")
        shutil.rmtree(job.parts_dir)
    _write_json_atomic(fp_path, job.fingerprint)


def _iter_part_records(path: str, tasks: list[PartTask], skipped: dict[int, str]
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


def build_scorer(s: ScoreSettings, load_model: bool = True):
    from embedder.scoring.lm_scorer import LMScorer

    return LMScorer(**s.lm, key_max_length=s.key_max_length, normalize=s.normalize, batch_size=s.batch_size,
                    max_tokens_per_batch=s.max_tokens_per_batch, packed=s.packed, load_model=load_model)


def _score_parts(s: ScoreSettings, jobs: list[FileJob], tasks: list[PartTask]) -> None:
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
        for task, rows in _iter_part_records(job.plan.path, ftasks, job.plan.skipped):
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
            flat = scorer.score(lm_jobs) if lm_jobs else np.zeros(0)
            scores, i = [], 0
            for n_keys, n_ans in shape:
                block = flat[i: i + n_keys * n_ans].reshape(n_keys, n_ans).mean(axis=1)
                scores.append([round(float(x), 6) for x in block])
                i += n_keys * n_ans
            seconds = time.perf_counter() - t0
            stats = dict(Counter(scorer.stats) - before)
            _write_json_atomic(_part_path(job, task.part), {
                "format": PART_FORMAT, "part": task.part, "start": task.start, "end": task.end,
                "lines": [line for line, _ in rows], "teacher_scores": scores, "stats": stats,
                "seconds": round(seconds, 3), "scorer": describe})
            done += 1
            progress.update(task.end - task.start)
            log.info("%s part %d/%d: %d records, %d LM inputs, %d tokens in %.1f s (%.1f inputs/s) [%d/%d parts here]",
                     job.plan.path, task.part + 1, job.n_parts, len(rows), len(lm_jobs),
                     stats.get("tokens", 0), seconds, len(lm_jobs) / max(seconds, 1e-9), done, len(tasks))
    progress.finish()


def _spawn_worker(rank: int, s: ScoreSettings, jobs: list[FileJob], tasks: list[PartTask]) -> None:
    import torch

    logging.basicConfig(level=logging.INFO, format=f"[worker {rank}] %(asctime)s %(name)s: %(message)s")
    os.environ["LOCAL_RANK"] = str(rank)  # device=auto then picks cuda:<rank>
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // s.devices))
    _score_parts(s, jobs, tasks[rank::s.devices])


def _spawn(s: ScoreSettings, jobs: list[FileJob], tasks: list[PartTask]) -> None:
    """One worker process per device; each scores every `devices`-th part. Parts are merged afterwards in order."""
    import torch.multiprocessing as mp

    n = min(s.devices, len(tasks))
    log.info("scoring %d parts with %d worker processes", len(tasks), n)
    s = ScoreSettings(**{**asdict(s), "devices": n})
    mp.start_processes(_spawn_worker, args=(s, jobs, tasks), nprocs=n, join=True, start_method="spawn")


def _wait_for(jobs: list[FileJob], tasks: list[PartTask], poll_s: float) -> None:
    """torchrun rank 0: wait until the other ranks have written their parts."""
    last = 0.0
    while True:
        missing = [t for t in tasks if not os.path.exists(_part_path(jobs[t.file_index], t.part))]
        if not missing:
            return
        if time.monotonic() - last > 60:
            log.info("waiting for %d parts from the other ranks", len(missing))
            last = time.monotonic()
        time.sleep(poll_s)


def _merge(job: FileJob, s: ScoreSettings) -> None:
    """Write the scored file (input order, atomically) and its meta sidecar; then drop the part cache."""
    stats: Counter = Counter()
    seconds = 0.0
    scorer: dict[str, Any] = {}

    def parts() -> Iterator[tuple[int, list[float]]]:
        nonlocal seconds, scorer
        for k in range(job.n_parts):
            part = _read_json(_part_path(job, k))
            if part.get("format") != PART_FORMAT or part["start"] != k * s.part_size:
                raise ValueError(f"{_part_path(job, k)} does not match this run; delete {job.parts_dir} and rerun")
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
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **_provenance(),
        "fingerprint": job.fingerprint,
    }
    _write_json_atomic(job.meta, meta)
    if not s.keep_parts:
        shutil.rmtree(job.parts_dir, ignore_errors=True)
    t = meta["truncation"]
    if t["context_truncated"] or t["keys_truncated"]:
        log.warning("%s: %d keys cut to key_max_length=%s; %d prompts over the context shortened from the knowledge "
                    "side (%d also cut from the left)", job.output, t["keys_truncated"], s.key_max_length,
                    t["context_truncated"], t["context_cut_left"])
    log.info("wrote %s (%d records) and %s", job.output, n, job.meta)


def _provenance() -> dict[str, Any]:
    import importlib.metadata as md

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sha = dirty = None
    try:
        sha = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip() or None
        if sha:
            dirty = bool(subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                                        capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {}
    for pkg in ("embedder", "torch", "transformers"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"git_sha": sha, "git_dirty": dirty, "versions": versions}


def _dry_run(s: ScoreSettings, jobs: list[FileJob], templates) -> dict[str, Any]:
    """Count LM inputs and estimate tokens from the first records of each file (tokenizer only, no model)."""
    from embedder.scoring.lm_scorer import Job

    scorer = build_scorer(s, load_model=False)
    results = []
    for job in jobs:
        sample_n = min(job.plan.records, 64)
        lm_jobs = []
        for index, (line, raw) in enumerate(iter_raw_lines(job.plan.path)):
            if index >= sample_n:
                break
            if line in job.plan.skipped:
                continue
            record, _ = trim_record(json.loads(raw), s.max_candidates)
            answers = choose_answers(record["answers"], s.answer_choice, s.seed, index)
            lm_jobs.extend(Job(templates[record.get("task", s.task)], record, k, a)
                           for k in candidate_list(record) for a in answers)
        enc = scorer.encode(lm_jobs)
        per_input = sum(len(e.input_ids) for e in enc) / max(1, len(enc))
        est = int(per_input * job.plan.pairs)
        results.append({"input": job.plan.path, "output": job.output, "status": "dry_run",
                        "records": job.plan.records, "candidates": job.plan.candidates, "pairs": job.plan.pairs,
                        "tokens_per_input": round(per_input, 1), "estimated_tokens": est})
        print(f"{job.plan.path}: {job.plan.records} records, {job.plan.pairs} LM inputs, ~{per_input:.0f} tokens "
              f"each, ~{est:,} tokens in all (estimated from {sample_n} records) -> {job.output}")
    return {"files": results}


def _print_summary(results: list[dict[str, Any]], seconds: float) -> None:
    if not results:
        return
    print(f"{'status':<8} {'records':>8} {'skipped':>8} {'inputs':>8} {'keys cut':>9} {'ctx cut':>8}  output")
    for r in results:
        print(f"{r['status']:<8} {r['records']:>8} {r.get('skipped', 0):>8} {r['pairs']:>8} "
              f"{r.get('keys_truncated', 0):>9} {r.get('context_truncated', 0):>8}  {r['output']}")
    print(f"done in {seconds:.1f} s")
