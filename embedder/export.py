"""The export: the trained encoder as a Hugging Face + sentence-transformers folder (with its prompts and model
card), written atomically, and optionally pushed to the Hub."""

from __future__ import annotations

import logging
import os
from typing import Any

from embedder.atomic import MANIFEST, read_json, staged_export
from embedder.errors import DataError, ModelLoadErrors

log = logging.getLogger(__name__)


def export_trained(module: Any, cfg: Any, tasks: dict, run_info: dict[str, Any], before: dict[str, float],
                   after: dict[str, float]) -> None:
    """The end of a training run (rank 0, with every parameter whole): the encoder with its prompts (from
    `export_record_kind`'s instructions) and a model card (the run, its data and its before -> after metrics)."""
    from embedder.data.kinds import export_prompts
    from embedder.model_card import model_card

    prompts = export_prompts(tasks, export_record_kind(cfg, tasks))
    export_encoder(module, cfg.output_dir, prompts, cfg.key_max_length,
                   card=model_card(run_info, prompts, before, after), lora_export=cfg.get("export_lora", "merged"))


def export_encoder(module: Any, out_dir: str, prompts: dict[str, str], max_seq_length: int,
                   card: str | None = None, lora_export: str = "merged") -> None:
    """Write the encoder into a temp folder, check it, then swap it into `out_dir` (embedder.atomic): a failed or
    degenerate run never replaces, or mixes into, an earlier export."""
    import torch

    bad = [n for n, p in module.encoder.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise DataError(f"the trained weights hold NaN/Inf ({len(bad)} tensors, e.g. {bad[0]}); nothing was exported "
                        f"and the earlier export in {out_dir} is kept", hint="lower optimizer.lr, check the "
                        "training data, or resume from an earlier checkpoint")
    with staged_export(out_dir) as tmp:
        module.encoder.save(tmp, prompts=prompts, max_seq_length=max_seq_length,
                            matryoshka_dims=getattr(module, "matryoshka_dims", None), lora_export=lora_export)
        if card:  # replaces the generic card sentence-transformers writes
            with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
                f.write(card)
    log.info("exported the encoder (Hugging Face + sentence-transformers) to %s", out_dir)


def export_record_kind(cfg: Any, tasks: dict) -> str | None:
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


def push_export(out_dir: str, repo_id: str, private: bool = True, commit_message: str = "embedder export") -> str:
    """Upload the export (the files `.export-manifest.json` lists: no checkpoints, logs or caches) to a Hub model
    repo, creating it if needed. Returns the commit URL."""
    from huggingface_hub import HfApi

    entries = read_json(os.path.join(out_dir, MANIFEST), "export manifest")["entries"]
    patterns = [p for e in entries for p in ((e, f"{e}/**") if os.path.isdir(os.path.join(out_dir, e)) else (e,))]
    api = HfApi()
    with ModelLoadErrors(repo_id, "hub.repo_id"):  # offline, gated, a bad name: one message
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=out_dir, repo_type="model", allow_patterns=patterns,
                                 commit_message=commit_message)
    log.info("pushed the export in %s to https://huggingface.co/%s", out_dir, repo_id)
    return str(getattr(info, "commit_url", info))
