"""`run_train(cfg)`: everything `train.py` does, callable from tests (lightning-hydra-template style).

The loop only: run the config's preparation stages, build the data, the eval sets, the module and the trainer,
evaluate before, fit, evaluate after, export. What each step needs lives in its own module: `checkpoints` (resume,
best state, ZeRO-3), `export` (the export, its card, the Hub), `provenance` (what a run was made with).
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from embedder.atomic import atomic_open, read_json, write_json
from embedder.checkpoints import (
    base_parameters,
    drop_zero3_hooks,
    gathered_parameters,
    load_best_state,
    merge_with_base,
    resolve_ckpt_path,
    restore_trained,
    trained_state,
)
from embedder.data.datamodule import RetrievalDataModule, load_train_files
from embedder.errors import DataError
from embedder.evaluation.eval_set import TRAINED_STORES, build_eval_sets
from embedder.evaluation.metrics import before_after_table
from embedder.export import export_trained, push_export
from embedder.host_memory import tune_malloc
from embedder.lit_module import RetrieverModule
from embedder.provenance import describe_run
from embedder.record_kinds import build_record_kinds
from embedder.report import write_report
from embedder.retrieval.encode.predict import encoder_identity

log = logging.getLogger(__name__)


def _instantiate_dict(cfg: DictConfig | None) -> list[Any]:
    return [hydra.utils.instantiate(c) for c in (cfg or {}).values() if c is not None and "_target_" in c]


def run_train(cfg: DictConfig) -> dict[str, float]:
    """Train (and evaluate before/after), export the encoder, return the final metrics."""
    L.seed_everything(cfg.seed, workers=True)
    malloc = cfg.get("host_malloc") or {}
    tune_malloc(malloc.get("mmap_threshold"), malloc.get("arena_max"))  # before the first large allocation
    for stage in cfg.get("prepare") or []:  # the task config's preparation stages, in order
        cfg = hydra.utils.instantiate(stage)(cfg)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.output_dir)
    tasks = build_record_kinds(OmegaConf.to_container(cfg.record_kinds, resolve=True), cfg.data.group_size,
                                OmegaConf.to_container(cfg.version.table, resolve=True), cfg.version.add_instruction)
    # Data first: bad training and eval records fail here, before any model is loaded.
    default_kind = cfg.get("default_record_kind") or (next(iter(tasks)) if len(tasks) == 1 else None)
    files = load_train_files(OmegaConf.to_container(cfg.train_data, resolve=True), cfg.data_root, tasks,
                             default_kind, cfg.seed) if cfg.train_data else []
    eval_sets = build_eval_sets(OmegaConf.to_container(cfg.eval, resolve=True) if cfg.get("eval") else None,
                                tasks, cfg.data_root, cfg.query_max_length, cfg.key_max_length, work_dir=cfg.output_dir,
                                training_run=True)
    encoder = hydra.utils.instantiate(cfg.model)
    # The untrained weights' eval embeddings are cached across runs (evaluate_before: one encode per model); a
    # resumed run starts from trained weights, which are never cached.
    identity = encoder_identity(encoder) if ckpt_path is None and eval_sets else None
    for es in eval_sets:
        es.remember_untrained(identity)
    datamodule = RetrievalDataModule(
        files, tasks, encoder.tokenizer, batch_size=cfg.data.batch_size, query_max_length=cfg.query_max_length,
        key_max_length=cfg.key_max_length, inbatch_same_dataset=cfg.data.inbatch_same_dataset,
        num_workers=cfg.data.num_workers, seed=cfg.seed, eval_sets=eval_sets,
        positive_ids=cfg.loss.get("mask_known_positives", False))
    module = RetrieverModule(
        encoder, tasks, temperature=cfg.loss.temperature, cross_device=cfg.loss.cross_device,
        in_batch_negatives=cfg.loss.in_batch_negatives, combine_rule=cfg.loss.combine_rule,
        optimizer=hydra.utils.instantiate(cfg.optimizer), warmup_ratio=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay, eval_sets=eval_sets,
        stop_on_nonfinite_loss=cfg.get("stop_on_nonfinite_loss", True),
        matryoshka_dims=cfg.loss.get("matryoshka_dims"), matryoshka_weights=cfg.loss.get("matryoshka_weights"),
        gradcache_mini_batch=cfg.loss.get("gradcache_mini_batch"),
        mask_duplicate_keys=cfg.loss.get("mask_duplicate_keys", False), directions=cfg.loss.get("directions"),
        mask_known_positives=cfg.loss.get("mask_known_positives", False))
    run_info = describe_run(cfg, datamodule)
    selected_on = {f"val/{es.name}/" for es in eval_sets if es.during_fit}
    monitored = cfg.get("optimized_metric")
    if monitored and not any(str(monitored).startswith(prefix) for prefix in selected_on):
        # nothing computes it during training (no eval set, or its set has during_fit: false, e.g.
        # a task whose only eval set is test): best_checkpoint keeps the latest state instead of failing at the first save
        log.info("%s is not computed during training (sets evaluated then: %s); best_checkpoint keeps the latest state",
                 monitored, sorted(p[4:-1] for p in selected_on) or "none")
        with open_dict(cfg):
            cfg.optimized_metric = None
    # CSV hparams.yaml, TensorBoard hparams, the W&B run config: logged by a callback, in the process that runs the
    # loop (a ddp_spawn worker), so the main process never opens the loggers' files before the workers do
    callbacks = _instantiate_dict(cfg.get("callbacks")) + [LogRunInfo(run_info)]
    loggers = _instantiate_dict(cfg.get("logger"))
    trainer_kwargs = {}
    if not eval_sets:
        trainer_kwargs["limit_val_batches"] = 0
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                                 **trainer_kwargs)

    _check_merge_settings(cfg, trainer)
    before: dict[str, float] = {}
    # beside metrics.json, so a resumed run still reports before -> after (not in checkpoints/: a file there makes
    # Lightning warn that the checkpoint folder "exists and is not empty" on every fresh run)
    before_path = os.path.join(cfg.output_dir, "metrics_before.json")
    legacy_before_path = os.path.join(cfg.output_dir, "checkpoints", "metrics_before.json")  # runs before 2026-12-03
    if eval_sets and cfg.evaluate_before and ckpt_path is None:
        before = _validate(trainer, module, datamodule)
        drop_zero3_hooks(trainer)
        if trainer.is_global_zero:
            write_json(before_path, before)
    elif ckpt_path is not None:
        found = [p for p in (before_path, legacy_before_path) if os.path.isfile(p)]
        before = read_json(found[0]) if found else {}
    if cfg.train_data:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        drop_zero3_hooks(trainer)
        if cfg.get("export_state", "last") == "best":
            load_best_state(module, callbacks, cfg.get("optimized_metric"))
        merge_choice = _merge_with_base(trainer, module, datamodule, cfg, callbacks)
    else:
        merge_choice = None
    after: dict[str, float] = {}
    if eval_sets:
        after = _validate(trainer, module, datamodule)
    if trainer.is_global_zero:  # the trained weights' eval stores (kept for `after`) are not needed any more
        shutil.rmtree(os.path.join(cfg.output_dir, TRAINED_STORES), ignore_errors=True)

    if cfg.export:
        # Under ZeRO-3 every rank holds a shard: gather the full weights on all ranks, write from rank 0.
        with gathered_parameters(trainer, module):
            if trainer.is_global_zero:
                export_trained(module, cfg, tasks, run_info, before, after)
    if trainer.is_global_zero:
        write_json(os.path.join(cfg.output_dir, "metrics.json"),
                   {"before": before, "after": after, **({"merge_base_weight": merge_choice} if merge_choice else {})})
        hub = cfg.get("hub") or {}
        if cfg.export and hub.get("repo_id"):
            push_export(cfg.output_dir, hub["repo_id"], private=bool(hub.get("private", True)),
                        commit_message=hub.get("commit_message") or f"embedder: {cfg.get('recipe_name', 'train')}")
        with atomic_open(os.path.join(cfg.output_dir, "config.yaml"), suffix=".yaml") as f:
            f.write(OmegaConf.to_yaml(cfg, resolve=False))
        if cfg.get("report", True):  # the loggers were finalised (flushed) at the end of each loop
            write_report(cfg.output_dir, before, after)
        if after:
            print(before_after_table(before, after))
    return after


class LogRunInfo(L.Callback):
    """Hands `describe_run`'s record to every logger once, when the first loop (validate or fit) starts."""

    def __init__(self, run_info: dict[str, Any]):
        self.run_info, self.done = run_info, False

    def _log(self, trainer: L.Trainer) -> None:
        if not self.done:
            for lg in trainer.loggers:
                lg.log_hyperparams(self.run_info)
            self.done = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer)


def _check_merge_settings(cfg: DictConfig, trainer: L.Trainer) -> None:
    """Before training: a merge_base_weight that cannot be applied stops the run now, not after the fit."""
    weights = cfg.get("merge_base_weight")
    if weights is None:
        return
    if getattr(trainer.strategy, "zero_stage_3", False):
        raise DataError("merge_base_weight is not supported under DeepSpeed ZeRO-3 (each rank holds a shard of the "
                        "weights)", field="merge_base_weight",
                        hint="set merge_base_weight=null, or train with ZeRO-2 (trainer.strategy=deepspeed_stage_2)")
    if OmegaConf.is_list(weights) and not cfg.get("optimized_metric"):
        raise DataError(f"merge_base_weight={list(weights)} is chosen on optimized_metric, and nothing computes it "
                        "during training", field="merge_base_weight",
                        hint="give one share (e.g. merge_base_weight=0.2), or an eval set evaluated during training "
                             "(a dev split) with optimized_metric naming its metric")


def _merge_with_base(trainer: L.Trainer, module: RetrieverModule, datamodule: RetrievalDataModule,
                     cfg: DictConfig, callbacks: list[Any]) -> dict[str, Any] | None:
    """`merge_base_weight` (LM-Cocktail) on the state to export: one share merges at it; a list of shares (0 = no
    merge) is tried one by one on the sets evaluated during training (dev, never test), and the best by
    `optimized_metric` is kept (ties: the smaller share). Each try costs one dev evaluation (the unmerged state's is
    reused when it was the last one scored). Returns what was chosen, for metrics.json, or None."""
    weights = cfg.get("merge_base_weight")
    if weights is None:
        return None
    if not OmegaConf.is_list(weights):
        merge_with_base(module, cfg.model, float(weights))
        return {"chosen": float(weights)}
    metric = cfg.optimized_metric
    mode = next((getattr(c, "mode", "max") for c in callbacks if getattr(c, "monitor", None) == metric), "max")
    candidates = sorted(float(w) for w in weights)
    saved = trained_state(module)
    base = base_parameters(module, cfg.model) if any(candidates) else {}
    scores: dict[float, float] = {}
    module.selecting = True
    try:
        for w in candidates:
            if w > 0:
                merge_with_base(module, cfg.model, w, base)
            scores[w] = _validate(trainer, module, datamodule)[metric]
            log.info("merge_base_weight %.2f: %s = %.4f", w, metric, scores[w])
            restore_trained(module, saved)
    finally:
        module.selecting = False
    sign = 1 if mode == "max" else -1
    chosen = max(candidates, key=lambda w: (sign * scores[w], -w))
    if chosen > 0:
        merge_with_base(module, cfg.model, chosen, base)
    log.info("merge_base_weight: %.2f chosen on %s (%s)", chosen, metric,
             ", ".join(f"{w:.2f}: {v:.4f}" for w, v in scores.items()))
    return {"chosen": chosen, "metric": metric, "tried": {f"{w:g}": v for w, v in scores.items()}}


def _validate(trainer: L.Trainer, module: RetrieverModule, datamodule: RetrievalDataModule) -> dict[str, float]:
    """Run every eval set once; the metrics come back from the workers under ddp_spawn too."""
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    return {k: float(v) for d in results for k, v in d.items() if k.startswith("val/")}


