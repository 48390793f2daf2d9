"""Fine-tune on your own BEIR folder in one command: `python train.py task=beir beir.folder=/data/beir/scifact`.

`prepare(cfg)` is the task's preparation stage (`prepare:` in configs/task/beir.yaml; `run_train` runs every stage
a config lists, and names no recipe). It fills in `train_data` and `eval`:

1. **split** (`<output_dir>/data/`, `embedder.data.beir.prepare_beir`): the BEIR folder (`corpus.jsonl` or `corpus.jsonl.gz`, `queries.jsonl`,
   `qrels/<split>.tsv`) becomes `corpus.json` (row i = document i), `train.json` (one record per train query with
   its positives' texts and rows), `dev.json` and, when `qrels/<test split>.tsv` exists, `test.json`. A folder
   without a dev split gets one: a seeded `dev_fraction` of the train queries, held out from training.
2. **mine** (`<output_dir>/data/mine-<retriever>/`): hard negatives for `train.json` with `mine.py`'s own code
   (`run_mine`), from the dense model being fine-tuned and/or BM25, from ranks `rank_range`, with the
   false-negative filter `relative_margin`. Two retrievers are merged into one list per query, alternating.
3. **score** (optional, `beir.teacher.lm`; `<output_dir>/data/score-<lm>/`): an LM's query likelihood
   log p(query | candidate) for each train query's positives and first negatives (`score.py`'s code, `run_score`,
   with the `beir` template: UPR, Sachan et al. 2022), which train.py distils with `beir.teacher.distill_weight`.
4. train.py then trains on the mined (and scored) file and evaluates dev (and test) before and after, as for any
   task.

Every step writes atomically and records what it was made from (`prepare.json`, the mined files' `.meta.json`);
a rerun with the same inputs and settings skips it. Memory follows the qrels (query texts and positive texts of
the train split), never the corpus, which is streamed.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from embedder.atomic import read_json, write_json
from embedder.config import CONFIG_DIR, compose
from embedder.data.beir import prepare_beir, stat_key
from embedder.data.corpus import open_corpus
from embedder.data.index_cache import untrained_stores_dir
from embedder.data.jsonl import write_jsonl_atomic
from embedder.distributed import prepare_once
from embedder.errors import DataError
from embedder.fingerprint import fingerprint
from embedder.mining.negatives import fill_records, merge_negatives

log = logging.getLogger(__name__)


def mine_negatives(cfg: DictConfig, prepared: dict[str, Any], out_dir: str) -> str:
    """Step 2: mine `train.json` with each retriever of `beir.negatives.retrievers`; returns the training file."""
    from embedder.mining.run import run_mine

    neg = cfg.beir.negatives
    retrievers = list(neg.retrievers or [])
    if not retrievers:
        return prepared["paths"]["train"]
    fill = _random_fill(neg)
    mined, keys = [], []
    for name in retrievers:
        known = sorted(f[:-5] for f in os.listdir(os.path.join(CONFIG_DIR, "retriever")) if f.endswith(".yaml"))
        if name not in known:
            raise DataError(f"{name!r} is not a retriever config (configs/retriever/)", field="beir.negatives.retrievers",
                            hint=f"use any of {known}, several ([dense,bm25]) or [] (in-batch negatives only)")
        folder = os.path.join(out_dir, f"mine-{name}")
        overrides = [f"retriever={name}", f"input_data={prepared['paths']['train']}",
                     f"corpus={prepared['paths']['corpus']}", f"output_dir={folder}", "save_to_output=true",
                     f"save_name={name}", f"hits={int(neg.hits)}",
                     f"rank_range=[{_rank_range_override(neg.rank_range)}]",
                     f"rank_range_of={neg.get('rank_range_of') or 'ranking'}",
                     f"max_neg_num={int(neg.max_neg_num)}",
                     f"relative_margin={'null' if neg.relative_margin is None else float(neg.relative_margin)}",
                     # several retrievers: the merged list is filled, not each one (a random passage is not
                     # interleaved with another retriever's hard negatives)
                     f"random_fill={'null' if fill is None or len(retrievers) > 1 else fill}",
                     f"seed={int(cfg.beir.seed)}",
                     f"query_max_length={int(cfg.query_max_length)}",
                     f"key_max_length={int(cfg.key_max_length)}", "version=none"]
        mine_cfg = compose("mine", overrides)
        with open_dict(mine_cfg):
            mine_cfg.key_template = str(cfg.beir.eval_set.key_template)  # set, not overridden: any text is safe
            if mine_cfg.retriever.get("uses_model"):  # the model being fine-tuned retrieves its own negatives
                mine_cfg.model = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
                mine_cfg.retriever.batch_size = int(neg.get("batch_size") or 64)
        stats_path = os.path.join(folder, f"train.neg.{name}.stats.json")
        key = _mine_key(prepared, OmegaConf.to_container(mine_cfg, resolve=True))
        out_path = os.path.join(folder, f"train.neg.{name}.json")
        if _step_done(stats_path, key, out_path):
            log.info("beir: negatives from %s already mined (%s); reusing them", name, out_path)
        else:
            if mine_cfg.retriever.get("uses_model"):  # set after the key: where a store lives changes no result
                # the corpus store goes where the training run's "before" evaluation looks for the untrained
                # encoder's stores: the same texts, lengths and weights, so the corpus is encoded once for both
                with open_dict(mine_cfg):
                    mine_cfg.retriever.corpus_store_dir = untrained_stores_dir()
            stats = run_mine(mine_cfg)
            write_json(stats_path, {"key": key, **{k: v for k, v in stats.items() if k != "key"}})
        mined.append(out_path)
        keys.append(key)
    if len(mined) == 1:
        return mined[0]
    merged = os.path.join(out_dir, "train.neg." + "+".join(retrievers) + ".json")
    merged_stats = merged[:-len(".json")] + ".stats.json"
    key = fingerprint(keys, int(neg.max_neg_num), fill, int(cfg.beir.seed))
    if _step_done(merged_stats, key, merged):
        log.info("beir: negatives of %s already merged (%s); reusing them", " and ".join(retrievers), merged)
        return merged
    records = merge_negatives(prepared["paths"]["train"], mined, int(neg.max_neg_num), keep_empty=fill is not None)
    counts: Counter = Counter()
    if fill is not None:
        corpus = open_corpus(prepared["paths"]["corpus"], str(cfg.beir.eval_set.key_template))
        records = fill_records(records, corpus, fill, int(cfg.beir.seed), counts)
    n = write_jsonl_atomic(merged, records)
    write_json(merged_stats, {"key": key, "records": n, "from": mined, "filled_with_random": counts["filled"],
                              "random_negatives": counts["random negatives"],
                              "skipped_no_negatives": counts["no negatives"]})
    log.info("beir: merged the negatives of %s into %s (%d records%s)", " and ".join(retrievers), merged, n,
             f"; {counts['filled']} filled with {counts['random negatives']} random negatives (random_fill={fill}), "
             f"{counts['no negatives']} with no negatives left" if fill is not None else "")
    return merged


def _step_done(stats_path: str, key: str, output: str | None = None) -> dict[str, Any] | None:
    """The cache check of steps 2 and 3: the step's stats (written last, so an interrupted step has none) when
    they record this `key` (inputs and settings) and its `output` (default: the stats' own "output") exists."""
    if not os.path.isfile(stats_path):
        return None
    stats = read_json(stats_path)
    output = output or stats.get("output") or ""
    return stats if stats.get("key") == key and os.path.isfile(output) else None


def _rank_range_override(rank_range: Any) -> str:
    """`beir.negatives.rank_range` as mine.py's override text: `[3, 100]`, `[3]` or `[3, null]` (to the last hit)."""
    return ",".join("null" if v is None else str(int(v)) for v in list(rank_range))


def _random_fill(neg: DictConfig) -> int | None:
    """`beir.negatives.random_fill` as mining takes it: an int, or None (off)."""
    return None if neg.get("random_fill") is None else int(neg.random_fill)


def _mine_key(prepared: dict[str, Any], mine_cfg: dict[str, Any]) -> str:
    relevant = {k: mine_cfg.get(k) for k in ("retriever", "model", "hits", "rank_range", "rank_range_of", "max_neg_num",
                                            "relative_margin", "random_fill", "seed", "key_template", "query_max_length",
                                            "key_max_length")}
    return fingerprint(prepared["key"], relevant)


def score_candidates(cfg: DictConfig, train_file: str, out_dir: str) -> str:
    """Step 3: teacher scores for `train_file` with the LM `beir.teacher.lm`; returns the scored file (or
    `train_file` itself when there is no teacher). Reused when the input and the teacher settings are unchanged;
    an interrupted scoring run resumes from its cached parts."""
    from embedder.scoring.run import run_score

    teacher = cfg.beir.get("teacher") or {}
    if not teacher.get("lm"):
        return train_file
    folder = os.path.join(out_dir, f"score-{teacher.lm}")
    overrides = [f"lm={teacher.lm}", f"input_data={train_file}", f"output_dir={folder}",
                 f"default_record_kind={cfg.default_record_kind}",
                 f"max_candidates={int(teacher.max_candidates)}", f"batch_size={int(teacher.batch_size)}"]
    score_cfg = compose("score", overrides)
    key = fingerprint(stat_key([train_file]), OmegaConf.to_container(score_cfg, resolve=True))
    stats_path = os.path.join(folder, "scored.stats.json")
    stats = _step_done(stats_path, key)
    if stats:
        log.info("beir: candidates already scored by %s (%s); reusing them", teacher.lm, stats["output"])
        return stats["output"]
    if os.path.isfile(stats_path):
        log.info("beir: the candidates or the teacher changed since %s was scored; scoring again", folder)
        shutil.rmtree(folder)  # this step's own folder: the stale scores and their part cache
    (result,) = run_score(score_cfg)["files"]  # an interrupted run (no stats yet) resumes from its parts
    write_json(stats_path, {"key": key, "output": result["output"], "records": result.get("records")})
    log.info("beir: %s scored the candidates of %s -> %s", teacher.lm, train_file, result["output"])
    return result["output"]


def _check_remining(b: DictConfig) -> None:
    """Refuse the re-mining settings that cannot work, before anything is mined (an hour on a large folder)."""
    neg, field = b.negatives, "beir.negatives.remine_after_epochs"
    if not list(neg.get("remine_after_epochs") or []):
        if neg.get("remine_merge"):
            raise DataError("remine_merge=true merges the re-mined negatives, and nothing is re-mined",
                            field="beir.negatives.remine_merge",
                            hint="set beir.negatives.remine_after_epochs (e.g. [1]), or remine_merge=false")
        return
    if "dev" not in list(b.get("eval_splits") or []):
        raise DataError("re-mining ranks the train queries against dev's corpus encoding, and dev is not evaluated",
                        field=field, hint="keep dev in beir.eval_splits, or set beir.negatives.remine_after_epochs=[]")
    if (b.get("teacher") or {}).get("lm"):
        raise DataError("re-mined candidates have no teacher scores to distil", field=field,
                        hint="use either beir.teacher.lm or beir.negatives.remine_after_epochs")
    if neg.get("remine_merge") and not list(neg.retrievers or []):
        raise DataError("remine_merge=true alternates the re-mined negatives with the first mining's, and "
                        "retrievers=[] mined none", field="beir.negatives.remine_merge",
                        hint="set beir.negatives.retrievers (e.g. [bm25]), or remine_merge=false")


def prepare(cfg: DictConfig) -> DictConfig:
    """task=beir's `prepare` stage (configs/task/beir.yaml lists it): steps 1 to 3 for `cfg.beir.folder`, then
    `train_data` and the `eval` sets (dev, and test when present) filled in from the prepared files.

    One process prepares (`distributed.prepare_once`): rank 0 of a torchrun/SLURM launch, or the one process that
    Lightning's DDP launcher later forks; the other ranks wait for its `data/run.json`. Two runs on one output folder
    take turns and the second reuses the first's files."""
    b = cfg.beir
    if OmegaConf.is_missing(b, "folder") or not b.folder:
        raise DataError("task=beir needs the BEIR folder", field="beir.folder",
                        hint="python train.py task=beir beir.folder=<folder with corpus.jsonl, queries.jsonl, "
                             "qrels/train.tsv> (or make finetune DATA=<folder>)")
    _check_remining(b)
    data_dir = os.path.join(cfg.output_dir, "data")
    key = fingerprint(OmegaConf.to_container(b, resolve=True), OmegaConf.to_container(cfg.model, resolve=True),
                      cfg.query_max_length, cfg.key_max_length)

    def build() -> dict[str, Any]:
        prepared = prepare_beir(str(b.folder), data_dir, b.train_split, b.dev_split, b.test_split,
                                float(b.dev_fraction), int(b.seed), str(b.eval_set.key_template))
        train_file = score_candidates(cfg, mine_negatives(cfg, prepared, data_dir), data_dir)
        return {"train_file": train_file, "paths": prepared["paths"]}

    run = prepare_once(os.path.join(data_dir, "run.json"), key, build, what="beir preparation")
    template = OmegaConf.to_container(b.eval_set, resolve=True)
    eval_sets = {}
    for role in b.get("eval_splits") or []:
        if role not in ("dev", "test"):
            raise DataError(f"{role!r} is not a prepared split", field="beir.eval_splits", hint="use dev and/or test")
        if role in run["paths"]:
            eval_sets[role] = {**template, "eval_data": run["paths"][role], "corpus": run["paths"]["corpus"],
                               "during_fit": role == "dev" or bool(b.get("test_during_fit", False))}
    with open_dict(cfg):
        cfg.train_data = [run["train_file"]]
        teacher = b.get("teacher") or {}
        if teacher.get("lm"):  # the scored file's teacher_scores are distilled (KL over each query's candidates)
            kind = cfg.record_kinds[cfg.default_record_kind]
            kind.losses = [*(kind.get("losses") or []),
                           {"_target_": "embedder.losses.KLDistillLoss", "weight": float(teacher.distill_weight)}]
        cfg.eval = OmegaConf.merge(OmegaConf.create(eval_sets), cfg.get("eval") or {})
        remine = list(b.negatives.get("remine_after_epochs") or [])
        if remine:  # _check_remining made sure dev is evaluated (prepare_beir always writes a dev split)
            neg = b.negatives
            cfg.callbacks = OmegaConf.merge(cfg.get("callbacks") or {}, {"remine_negatives": {
                "_target_": "embedder.remine.RemineNegatives", "after_epochs": remine,
                "queries": run["paths"]["train"], "out_dir": os.path.join(data_dir, "remine"), "eval_set": "dev",
                "hits": int(neg.hits), "rank_range": list(neg.rank_range),
                "rank_range_of": neg.get("rank_range_of") or "ranking",
                "max_neg_num": int(neg.max_neg_num),
                "relative_margin": None if neg.relative_margin is None else float(neg.relative_margin),
                "random_fill": _random_fill(neg),
                "seed": int(b.seed),
                # the re-mined negatives alternate with the first mining's (_check_remining: there is one)
                "merge_with": run["train_file"] if neg.get("remine_merge") else None}})
    return cfg
