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

import json
import logging
import os
import time
from dataclasses import asdict
from typing import Any

from omegaconf import DictConfig

from embedder.data.records import candidate_list
from embedder.distributed import launched_rank, launched_world_size
from embedder.scoring.parts import FileJob, PartTask, check_existing, file_fingerprint, merge, part_path, score_parts
from embedder.scoring.records import choose_answers, iter_raw_lines, plan_file, trim_record
from embedder.scoring.settings import ScoreSettings, build_scorer, output_paths, settings_from_cfg
from embedder.scoring.templates import build_templates

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------------------ config
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
        jobs.append(FileJob(plan, out, meta, parts, n_parts, file_fingerprint(plan, s, templates)))
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
        check_existing(job, s)
    all_parts = [PartTask(fi, k, k * s.part_size, min((k + 1) * s.part_size, job.plan.records))
                 for fi, job in enumerate(jobs) if job.status == "todo" for k in range(job.n_parts)]
    lo, hi = s.shard_id * len(all_parts) // s.num_shards, (s.shard_id + 1) * len(all_parts) // s.num_shards
    world, rank = launched_world_size(), launched_rank()
    # torchrun: rank r owns every world-th part of this job (fixed before skipping cached parts, so ranks agree)
    assigned = all_parts[lo:hi][rank::world] if world > 1 else all_parts[lo:hi]
    mine = [t for t in assigned if not os.path.exists(part_path(jobs[t.file_index], t.part))]
    if len(mine) < len(assigned):
        log.info("resuming: %d of %d parts are already cached", len(assigned) - len(mine), len(assigned))

    # 3. Score this job's parts: here, in `devices` spawned workers, or as one torchrun rank.
    if world > 1:
        score_parts(s, jobs, mine)
        if rank != 0:
            return {"files": [], "rank": rank}
        _wait_for(jobs, all_parts[lo:hi], s.merge_poll_s)
    elif s.devices > 1 and len(mine) > 1:
        _spawn(s, jobs, mine)
    else:
        score_parts(s, jobs, mine)

    # 4. Merge every file whose parts are all there.
    results = []
    for job in jobs:
        if job.status == "todo":
            missing = [k for k in range(job.n_parts) if not os.path.exists(part_path(job, k))]
            if missing:
                job.status = "partial"
                log.info("%s: %d of %d parts still to score (other shards); rerun any shard job to finish it",
                         job.output, len(missing), job.n_parts)
            else:
                merge(job, s)
                job.status = "scored"
        results.append({"input": job.plan.path, "output": job.output, "meta": job.meta, "status": job.status,
                        "records": job.plan.records - len(job.plan.skipped), "skipped": len(job.plan.skipped), "candidates": job.plan.candidates, "pairs": job.plan.pairs,
                        **{k: v for k, v in job.stats.items()}})
    _print_summary(results, time.perf_counter() - t0)
    return {"files": results}


def _spawn_worker(rank: int, s: ScoreSettings, jobs: list[FileJob], tasks: list[PartTask]) -> None:
    import torch

    logging.basicConfig(level=logging.INFO, format=f"[worker {rank}] %(asctime)s %(name)s: %(message)s")
    os.environ["LOCAL_RANK"] = str(rank)  # device=auto then picks cuda:<rank>
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // s.devices))
    score_parts(s, jobs, tasks[rank::s.devices])


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
        missing = [t for t in tasks if not os.path.exists(part_path(jobs[t.file_index], t.part))]
        if not missing:
            return
        if time.monotonic() - last > 60:
            log.info("waiting for %d parts from the other ranks", len(missing))
            last = time.monotonic()
        time.sleep(poll_s)


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
