"""Checkpoints: which one a run resumes from (checked before Lightning reads it), which one holds the best state,
and the DeepSpeed ZeRO-3 details of moving between validate, fit and export on one module."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
from typing import Any

from embedder.errors import DataError

log = logging.getLogger(__name__)


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
            return check_checkpoint(found[-1])
        if ckpt_path == "last_or_none":
            log.info("ckpt_path=last_or_none: no checkpoint in %s; starting fresh", folder)
            return None
        raise DataError("ckpt_path=last: no last*.ckpt in this folder", path=folder,
                        hint="check output_dir (the run being resumed wrote its checkpoints there), or use "
                        "ckpt_path=last_or_none where starting fresh is fine (e.g. a requeued SLURM job)")
    if not os.path.exists(ckpt_path):
        raise DataError("checkpoint not found", path=ckpt_path, field="ckpt_path",
                        hint="give a .ckpt file, ckpt_path=last, or ckpt_path=null to start fresh")
    return check_checkpoint(ckpt_path)


def check_checkpoint(path: str) -> str:
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


def load_best_state(module: Any, callbacks: list[Any], monitor: str | None) -> str | None:
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
    module.load_state_dict(state["state_dict"], strict=getattr(module, "strict_loading", True))  # LoRA: adapters only
    score = cb.best_model_score if cb is not None else None
    log.info("export_state=best: loaded %s (step %s, %s = %s); evaluating and exporting it", path,
             state.get("global_step"), monitor, f"{float(score):.4f}" if score is not None else "?")
    return path


def drop_zero3_hooks(trainer: Any) -> None:
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


def gathered_parameters(trainer: Any, module: Any):
    """A context in which every parameter is whole (DeepSpeed ZeRO-3 shards them); a no-op otherwise."""
    if getattr(trainer.strategy, "zero_stage_3", False):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def base_parameters(module: Any, model_cfg: Any) -> dict[str, Any]:
    """The base model's parameters that `merge_with_base` blends in: a fresh instance of the `model` config, built
    only when a backbone weight itself was trained (not under LoRA: its lora_A would be a fresh random draw, and a
    7B backbone need not be loaded twice). Built once when several merge weights are tried."""
    import hydra
    from omegaconf import OmegaConf

    if not any(p.requires_grad and "lora_" not in name for name, p in module.encoder.named_parameters()):
        return {}
    spec = OmegaConf.to_container(model_cfg, resolve=True) if OmegaConf.is_config(model_cfg) else dict(model_cfg)
    return dict(hydra.utils.instantiate({**spec, "lora": None}).named_parameters())


def merge_with_base(module: Any, model_cfg: Any, base_weight: float, base: dict[str, Any] | None = None) -> int:
    """LM-Cocktail-style merge (Xiao et al., 2023): every trained parameter becomes (1 - w) x itself + w x the base
    model's (`base`, else `base_parameters(module, model_cfg)`), so the export keeps part of what the base model
    knew. Only parameters that training changed are touched; with LoRA the backbone is the base, so scaling each
    adapter's B by (1 - w) gives the same merge: (1 - w)(W0 + BA) + w W0 = W0 + (1 - w) BA. Returns the tensors
    merged."""
    import torch

    if not 0 < base_weight < 1:
        raise ValueError(f"merge_base_weight={base_weight}: a number between 0 and 1 (the base model's share)")
    trained = [(name, p) for name, p in module.encoder.named_parameters() if p.requires_grad]
    base = base_parameters(module, model_cfg) if base is None else base
    merged = 0
    with torch.no_grad():
        for name, p in trained:
            if "lora_B" in name:
                p.mul_(1 - base_weight)
                merged += 1
            elif name in base and base[name].shape == p.shape:
                p.mul_(1 - base_weight).add_(base[name].to(p.device, p.dtype), alpha=base_weight)
                merged += 1
    log.info("merged the trained weights with the base model's (base weight %.2f): %d tensors", base_weight, merged)
    return merged


def trained_state(module: Any) -> dict[str, Any]:
    """A copy of the trained parameters (what `merge_with_base` changes), to undo a merge with `restore_trained`:
    the adapters under LoRA, the whole encoder otherwise (one more copy on the rank's device: 0.09 GB for MiniLM,
    0.44 GB for bert-base in fp32)."""
    return {name: p.detach().clone() for name, p in module.encoder.named_parameters() if p.requires_grad}


def restore_trained(module: Any, state: dict[str, Any]) -> None:
    import torch

    with torch.no_grad():
        for name, p in module.encoder.named_parameters():
            if name in state:
                p.copy_(state[name])
