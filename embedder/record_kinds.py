"""`record_kinds:` of the config -> `{kind: RecordKind}`: instructions, sampling, and the losses each kind lists.

A kind lists its losses with weights, each built by `_target_` (any importable loss class; embedder.losses has
InfoNCELoss, KLDistillLoss and StableDistillLoss):

    record_kinds:
      qa:
        losses:
          - {_target_: embedder.losses.StableDistillLoss, weight: 1.0, teacher_temperature: 1.0}

The shared settings of `loss:` (temperature, cross_device, in_batch_negatives, mask_duplicate_keys, mask_known_positives,
directions) are passed by the training module to every listed loss whose class takes them, unless the entry sets its
own. This module sits above data/ and losses/: it reads each class's `uses_teacher_scores` /
`sorts_negatives_by_teacher` so the data layer never imports a loss.

The old per-kind block (`loss: {contrastive_weight, distill_weight, teacher_temperature, student_temperature,
stable_distill}`, before 0.2) keeps working for one release, with a warning: it is folded into `losses`, so
`record_kinds.qa.loss.distill_weight=0` on the command line or in a user's own task YAML means what it meant.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

from embedder.data.kinds import Instruction, LossSpec, RecordKind
from embedder.data.sampling import SamplingConfig

log = logging.getLogger(__name__)

CONTRASTIVE, KL_DISTILL, STABLE_DISTILL = ("embedder.losses.InfoNCELoss", "embedder.losses.KLDistillLoss",
                                           "embedder.losses.StableDistillLoss")
# A kind that lists no losses trains as the reference's default did (contrastive_weight 0.2, distill_weight 1.0).
DEFAULT_LOSSES = ({"_target_": CONTRASTIVE, "weight": 0.2}, {"_target_": KL_DISTILL, "weight": 1.0})
LEGACY_KEYS = ("contrastive_weight", "distill_weight", "teacher_temperature", "student_temperature", "stable_distill")
_warned: set[str] = set()


def build_record_kinds(tasks: Mapping[str, Any], group_size: int, version: Mapping[str, Any] | None = None,
                        add_instruction: bool = True) -> dict[str, RecordKind]:
    """Turn the `record_kinds:` config mapping into frozen settings.

    `version` is the instruction table chosen by `version=` (bge, e5, instructor, none, llm-embedder). It maps a
    kind name (or `default`) to `{query, key}`; a kind it does not name keeps the instruction of its task config
    (the llm-embedder strings).
    """
    version = dict(version or {})
    out: dict[str, RecordKind] = {}
    for name, spec in tasks.items():
        spec = dict(spec or {})
        unknown = set(spec) - {"instruction", "sampling", "losses", "loss"}
        if unknown:
            raise ValueError(f"record_kinds.{name}: unknown keys {sorted(unknown)}; valid: instruction, sampling, "
                             "losses")
        inst = dict(version.get(name, version.get("default", spec.get("instruction") or {})) or {})
        instruction = Instruction(query=inst.get("query") or "", key=inst.get("key") or "") if add_instruction \
            else Instruction()
        losses = loss_specs(name, spec.get("losses"), spec.get("loss"))
        classes = [loss_class(name, i, s.target) for i, s in enumerate(losses)]
        s = dict(spec.get("sampling") or {})
        sampling = SamplingConfig(
            select_positive=s.get("select_positive", "first"),
            select_negative=s.get("select_negative", "random"),
            group_size=int(s.get("group_size") or group_size),
            teacher_scores_margin=s.get("teacher_scores_margin"),
            teacher_scores_min=s.get("teacher_scores_min"),
            max_sample_num=s.get("max_sample_num"),
            stable_distill=any(getattr(c, "sorts_negatives_by_teacher", False) for c in classes),
        )
        out[name] = RecordKind(name=name, instruction=instruction, sampling=sampling, losses=tuple(losses),
                                 needs_teacher_scores=any(getattr(c, "uses_teacher_scores", False) for c in classes))
    return out


def loss_specs(kind: str, losses: Any, legacy: Mapping[str, Any] | None = None) -> list[LossSpec]:
    """The kind's `losses` list (the default when absent), with an old `loss:` block folded in; checked: every
    entry names a class, a weight >= 0 and only arguments its class takes. Entries with weight 0 are dropped (a
    weight of 0 turns a loss off)."""
    entries = [dict(e) for e in (DEFAULT_LOSSES if losses is None else losses)]
    if legacy:
        entries = _fold_legacy(kind, entries, dict(legacy))
    out = []
    for i, entry in enumerate(entries):
        where = f"record_kinds.{kind}.losses[{i}]"
        if not isinstance(entry.get("_target_"), str):
            raise ValueError(f"{where}: each loss needs `_target_` (a loss class, e.g. {CONTRASTIVE}); got {entry}")
        weight = entry.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"{where}.weight={weight!r}: a number >= 0 (0 turns the loss off)")
        target = entry.pop("_target_")
        cls = loss_class(kind, i, target)
        params = inspect.signature(cls.__init__).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            bad = sorted(set(entry) - set(params) - {"self"})
            if bad:
                raise ValueError(f"{where}: {target} takes no argument {bad}; it takes "
                                 f"{sorted(set(params) - {'self'})} (and weight)")
        if weight > 0:
            out.append(LossSpec(target=target, weight=float(weight), kwargs=entry))
    return out


def loss_class(kind: str, index: int, target: str) -> type:
    """The class `target` names (imported by path), or a message naming the config key."""
    from hydra.utils import get_class

    try:
        return get_class(target)
    except Exception as e:  # an import error or a name that is not a class
        raise ValueError(f"record_kinds.{kind}.losses[{index}]._target_={target!r} is not an importable loss class "
                         f"({e}); e.g. {CONTRASTIVE}, {KL_DISTILL}, {STABLE_DISTILL}") from None


def _fold_legacy(kind: str, entries: list[dict[str, Any]], legacy: dict[str, Any]) -> list[dict[str, Any]]:
    """Apply an old-style `loss:` block to the built-in losses of `entries` (see the module docstring)."""
    unknown = set(legacy) - set(LEGACY_KEYS)
    if unknown:
        raise ValueError(f"record_kinds.{kind}.loss: unknown keys {sorted(unknown)}; the old block has "
                         f"{list(LEGACY_KEYS)}; better: list the losses in record_kinds.{kind}.losses")
    others = [e["_target_"] for e in entries if e.get("_target_") not in (CONTRASTIVE, KL_DISTILL, STABLE_DISTILL)]
    if others:
        raise ValueError(f"record_kinds.{kind}.loss (the old block) only sets the built-in losses, and this kind lists "
                         f"{others}; set record_kinds.{kind}.losses instead")
    if kind not in _warned:
        _warned.add(kind)
        log.warning("record_kinds.%s.loss (contrastive_weight, distill_weight, ...) is deprecated and will be removed "
                    "in 0.3; list the losses instead: record_kinds.%s.losses=[{_target_: ..., weight: ...}]", kind, kind)
    con = next((e for e in entries if e["_target_"] == CONTRASTIVE), {})
    dis = next((e for e in entries if e["_target_"] in (KL_DISTILL, STABLE_DISTILL)), {})
    view = {"contrastive_weight": con.get("weight", 1.0) if con else 0.0,
            "distill_weight": dis.get("weight", 1.0) if dis else 0.0,
            "stable_distill": dis.get("_target_") == STABLE_DISTILL,
            "teacher_temperature": dis.get("teacher_temperature", 1.0),
            "student_temperature": dis.get("student_temperature", 1.0), **legacy}
    out = []
    if view["contrastive_weight"]:
        out.append({**con, "_target_": CONTRASTIVE, "weight": view["contrastive_weight"]})
    if view["distill_weight"]:
        out.append({"_target_": STABLE_DISTILL if view["stable_distill"] else KL_DISTILL,
                    "weight": view["distill_weight"], "teacher_temperature": view["teacher_temperature"],
                    **({} if view["stable_distill"] else {"student_temperature": view["student_temperature"]})})
    return out


build_task_settings = build_record_kinds  # the old name, kept for one release (0.2 -> 0.3)
