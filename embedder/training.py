"""`run_train(cfg)`: everything `train.py` does, callable from tests (lightning-hydra-template style)."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from embedder.atomic import MANIFEST, atomic_open, read_json, staged_export, write_json
from embedder.data.datamodule import RetrievalDataModule
from embedder.data.tasks import build_task_settings, export_prompts
from embedder.errors import DataError, model_load_errors
from embedder.evaluation.eval_set import TRAINED_STORES, build_eval_sets
from embedder.host_memory import tune_malloc
from embedder.lit_module import RetrieverModule
from embedder.model_card import model_card
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
    tasks = build_task_settings(OmegaConf.to_container(cfg.record_kinds, resolve=True), cfg.data.group_size,
                                OmegaConf.to_container(cfg.version.table, resolve=True), cfg.version.add_instruction)
    # Data first: bad records fail here, before any model is loaded.
    datamodule = RetrievalDataModule(
        train_data=OmegaConf.to_container(cfg.train_data, resolve=True) if cfg.train_data else None,
        data_root=cfg.data_root, tasks=tasks, tokenizer=None, batch_size=cfg.data.batch_size,
        query_max_length=cfg.query_max_length, key_max_length=cfg.key_max_length,
        inbatch_same_dataset=cfg.data.inbatch_same_dataset, num_workers=cfg.data.num_workers, seed=cfg.seed,
        default_task=cfg.get("default_record_kind") or (next(iter(tasks)) if len(tasks) == 1 else None))
    if cfg.train_data:
        datamodule.load()
    eval_sets = build_eval_sets(OmegaConf.to_container(cfg.eval, resolve=True) if cfg.get("eval") else None,
                                tasks, cfg.data_root, cfg.query_max_length, cfg.key_max_length, work_dir=cfg.output_dir)
    datamodule.eval_sets = eval_sets

    encoder = hydra.utils.instantiate(cfg.model)
    # The untrained weights' eval embeddings are cached across runs (evaluate_before: one encode per model); a
    # resumed run starts from trained weights, which are never cached.
    identity = encoder_identity(encoder) if ckpt_path is None and eval_sets else None
    for es in eval_sets:
        es.training_run, es.initial_identity = True, identity
    datamodule.collator.tokenizer = encoder.tokenizer
    module = RetrieverModule(
        encoder, tasks, temperature=cfg.loss.temperature, cross_device=cfg.loss.cross_device,
        in_batch_negatives=cfg.loss.in_batch_negatives, combine_rule=cfg.loss.combine_rule,
        optimizer=hydra.utils.instantiate(cfg.optimizer), warmup_ratio=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay, eval_sets=eval_sets,
        stop_on_nonfinite_loss=cfg.get("stop_on_nonfinite_loss", True))
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

    before: dict[str, float] = {}
    before_path = os.path.join(cfg.output_dir, "checkpoints", "metrics_before.json")
    if eval_sets and cfg.evaluate_before and ckpt_path is None:
        before = _validate(trainer, module, datamodule)
        _drop_zero3_hooks(trainer)
        if trainer.is_global_zero:  # kept beside the checkpoints, so a resumed run still reports before -> after
            write_json(before_path, before)
    elif ckpt_path is not None and os.path.isfile(before_path):
        before = read_json(before_path)
    if cfg.train_data:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        _drop_zero3_hooks(trainer)
        if cfg.get("export_state", "last") == "best":
            load_best_state(module, callbacks, cfg.get("optimized_metric"))
    after: dict[str, float] = {}
    if eval_sets:
        after = _validate(trainer, module, datamodule)
    if trainer.is_global_zero:  # the trained weights' eval stores (kept for `after`) are not needed any more
        shutil.rmtree(os.path.join(cfg.output_dir, TRAINED_STORES), ignore_errors=True)

    if cfg.export:
        # Under ZeRO-3 every rank holds a shard: gather the full weights on all ranks, write from rank 0.
        with _gathered_parameters(trainer, module):
            if trainer.is_global_zero:
                prompts = export_prompts(tasks, _default_export_task(cfg, tasks))
                _export(module, cfg.output_dir, prompts, cfg.key_max_length,
                        card=model_card(run_info, prompts, before, after))
    if trainer.is_global_zero:
        write_json(os.path.join(cfg.output_dir, "metrics.json"), {"before": before, "after": after})
        hub = cfg.get("hub") or {}
        if cfg.export and hub.get("repo_id"):
            push_export(cfg.output_dir, hub["repo_id"], private=bool(hub.get("private", True)),
                        commit_message=hub.get("commit_message") or f"embedder: {cfg.get('recipe_name', 'train')}")
        with atomic_open(os.path.join(cfg.output_dir, "config.yaml"), suffix=".yaml") as f:
            f.write(OmegaConf.to_yaml(cfg, resolve=False))
        if cfg.get("report", True):  # the loggers were finalised (flushed) at the end of each loop
            write_report(cfg.output_dir, before, after)
        if after:
            print(metrics_table(before, after))
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


def push_export(out_dir: str, repo_id: str, private: bool = True, commit_message: str = "embedder export") -> str:
    """Upload the export (the files `.export-manifest.json` lists: no checkpoints, logs or caches) to a Hub model
    repo, creating it if needed. Returns the commit URL."""
    from huggingface_hub import HfApi

    entries = read_json(os.path.join(out_dir, MANIFEST), "export manifest")["entries"]
    patterns = [p for e in entries for p in ((e, f"{e}/**") if os.path.isdir(os.path.join(out_dir, e)) else (e,))]
    api = HfApi()
    with model_load_errors(repo_id, "hub.repo_id"):  # offline, gated, a bad name: one message
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=out_dir, repo_type="model", allow_patterns=patterns,
                                 commit_message=commit_message)
    log.info("pushed the export in %s to https://huggingface.co/%s", out_dir, repo_id)
    return str(getattr(info, "commit_url", info))


def _default_export_task(cfg: DictConfig, tasks: dict) -> str | None:
    """The task whose instructions become the export's `query`/`document` prompts: `export_record_kind`, else the
    only task, else qa when the run has it (the LLM-Embedder recipe), else none (a warning says so)."""
    name = cfg.get("export_record_kind")
    if name:
        return str(name)
    if len(tasks) == 1:
        return next(iter(tasks))
    if "qa" in tasks:
        return "qa"
    log.warning("no export_record_kind and no qa task: the export has <task>_query/<task>_key prompts only, so "
                "encode_query/encode_document apply no instruction; set export_record_kind=<one of %s>", sorted(tasks))
    return None


def describe_run(cfg: DictConfig, datamodule: RetrievalDataModule | None = None) -> dict[str, Any]:
    """What the loggers record about a run: the resolved config, the training files with their record counts, the
    git commit of the code and the versions of the packages that decide the numbers."""
    import importlib.metadata
    import subprocess

    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that needs a running Hydra job (compose API in notebooks and tests)
        config = OmegaConf.to_container(cfg, resolve=False)
    versions = {}
    for pkg in ("embedder", "torch", "transformers", "lightning", "sentence-transformers", "faiss-cpu", "deepspeed"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    files = {f.path: len(f.records) for f in (getattr(datamodule, "files", None) or [])}
    return {**config, "run": {"git_commit": commit, "versions": versions, "train_records": files}}


def _export(module: RetrieverModule, out_dir: str, prompts: dict[str, str], max_seq_length: int,
            card: str | None = None) -> None:
    """Write the encoder into a temp folder, check it, then swap it into `out_dir` (embedder.atomic): a failed or
    degenerate run never replaces, or mixes into, an earlier export."""
    import torch

    bad = [n for n, p in module.encoder.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise DataError(f"the trained weights hold NaN/Inf ({len(bad)} tensors, e.g. {bad[0]}); nothing was exported "
                        f"and the earlier export in {out_dir} is kept", hint="lower optimizer.lr, check the "
                        "training data, or resume from an earlier checkpoint")
    with staged_export(out_dir) as tmp:
        module.encoder.save(tmp, prompts=prompts, max_seq_length=max_seq_length)
        if card:  # replaces the generic card sentence-transformers writes
            with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
                f.write(card)
    log.info("exported the encoder (Hugging Face + sentence-transformers) to %s", out_dir)


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str) -> str | None:
    """`last`: the newest `last*.ckpt` in output_dir/checkpoints, and an error when there is none; `last_or_none`:
    the same, or a fresh start; a path: it must exist and be a readable checkpoint. Lightning itself would start from
    scratch with only a warning when `last` finds nothing."""
    if ckpt_path in (None, "null", ""):
        return None
    if ckpt_path in ("best", "hpc", "registry"):  # Lightning's own keywords
        return ckpt_path
    folder = os.path.join(output_dir, "checkpoints")
    if ckpt_path in ("last", "last_or_none"):
        found = sorted(glob.glob(os.path.join(folder, "last*.ckpt")), key=os.path.getmtime)
        if found:
            return _check_checkpoint(found[-1])
        if ckpt_path == "last_or_none":
            log.info("ckpt_path=last_or_none: no checkpoint in %s; starting fresh", folder)
            return None
        raise DataError("ckpt_path=last: no last*.ckpt in this folder", path=folder,
                        hint="check output_dir (the run being resumed wrote its checkpoints there), or use "
                        "ckpt_path=last_or_none where starting fresh is fine (e.g. a requeued SLURM job)")
    if not os.path.exists(ckpt_path):
        raise DataError("checkpoint not found", path=ckpt_path, field="ckpt_path",
                        hint="give a .ckpt file, ckpt_path=last, or ckpt_path=null to start fresh")
    return _check_checkpoint(ckpt_path)


def _check_checkpoint(path: str) -> str:
    """A torch.save checkpoint is a zip archive: check its structure and CRCs (reading it once, no unpickling), so
    a truncated or corrupt file fails here with its name, not deep inside torch.load. DeepSpeed folders pass."""
    import zipfile

    if os.path.isdir(path):
        return path
    try:
        with zipfile.ZipFile(path) as z:
            broken = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        broken = str(e) or type(e).__name__
    if broken:
        raise DataError(f"the checkpoint is corrupt or truncated ({broken})", path=path, field="ckpt_path",
                        hint="resume from an earlier checkpoint (ckpt_path=<file>), or ckpt_path=null to start fresh")
    return path


def load_best_state(module: RetrieverModule, callbacks: list[Any], monitor: str | None) -> str | None:
    """`export_state=best`: load the weights of the best checkpoint by `monitor` into `module` (the `after`
    evaluation and the export then use them); the last state stays when nothing was monitored or the checkpoint is
    a DeepSpeed folder. Returns the checkpoint loaded, or None."""
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    if not monitor:
        log.info("export_state=best: nothing was monitored during training; the last state is exported")
        return None
    cb = next((c for c in callbacks if isinstance(c, ModelCheckpoint) and c.monitor == monitor), None)
    path = cb.best_model_path if cb is not None else ""
    if not path and cb is not None and cb.dirpath:  # a ddp_spawn parent: its callback copy saw no save
        found = sorted(glob.glob(os.path.join(cb.dirpath, f"{cb.filename or 'best'}*.ckpt")), key=os.path.getmtime)
        path = found[-1] if found else ""
    if not path or os.path.isdir(path):
        log.info("export_state=best: no best checkpoint file for %s%s; the last state is exported", monitor,
                 f" ({path} is a DeepSpeed folder)" if path else "")
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(state["state_dict"])
    score = cb.best_model_score if cb is not None else None
    log.info("export_state=best: loaded %s (step %s, %s = %s); evaluating and exporting it", path,
             state.get("global_step"), monitor, f"{float(score):.4f}" if score is not None else "?")
    return path


def _validate(trainer: L.Trainer, module: RetrieverModule, datamodule: RetrievalDataModule) -> dict[str, float]:
    """Run every eval set once; the metrics come back from the workers under ddp_spawn too."""
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    return {k: float(v) for d in results for k, v in d.items() if k.startswith("val/")}


def _drop_zero3_hooks(trainer: L.Trainer) -> None:
    """Remove the ZeRO-3 parameter hooks of the DeepSpeed engine that just finished (validate or fit).

    Lightning builds a new engine for each of validate, fit and validate on the same module; under ZeRO-3 each one
    registers forward/backward hooks whose parameter coordinator records a module trace. The hooks of an earlier
    engine stay on the module and keep recording next to the new engine's, and the stale trace failed the first
    training step after `evaluate_before` (IndexError in DeepSpeed's record_parameters, seen on an H200). DeepSpeed
    has no public call for this; `_remove_module_hooks` is what its own teardown uses."""
    if not getattr(trainer.strategy, "zero_stage_3", False):
        return
    engine = getattr(trainer.strategy, "model", None)
    offload = getattr(engine, "optimizer", None)
    offload = getattr(offload, "parameter_offload", offload)  # training: the ZeRO-3 optimizer's; inference: itself
    if offload is not None and hasattr(offload, "_remove_module_hooks"):
        offload._remove_module_hooks()


def _gathered_parameters(trainer: L.Trainer, module: RetrieverModule):
    """A context in which every parameter is whole (DeepSpeed ZeRO-3 shards them); a no-op otherwise."""
    if getattr(trainer.strategy, "zero_stage_3", False):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def metrics_table(before: dict[str, float], after: dict[str, float]) -> str:
    """A plain before -> after table of evaluation metrics."""
    lines = [f"{'metric':<34}{'before':>10}{'after':>10}{'change':>10}"]
    for key in sorted(after):
        b = before.get(key)
        a = after[key]
        lines.append(f"{key:<34}{(f'{b:.4f}' if b is not None else '-'):>10}{a:>10.4f}"
                     f"{(f'{a - b:+.4f}' if b is not None else ''):>10}")
    return "\n".join(lines)
