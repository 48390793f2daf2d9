"""Fail early on misspelt config keys, listing the valid ones (Hydra only says "not in struct").

Hand-written because Hydra's error for an unknown key names the key but not the alternatives; users coming from
the reference's long flag lists mistype keys often, so we show the valid keys at that level and the closest match.
"""

from __future__ import annotations

import difflib

from omegaconf import DictConfig, ListConfig


def unknown_key_message(cfg: DictConfig, key: str) -> str | None:
    """None if `key` (dotted) exists in cfg, else a message listing the valid keys at the first missing level."""
    node = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return None  # inside a list or a value: leave it to Hydra
        if part not in node.keys():  # `in node` is False for a ??? (missing) value
            parent = ".".join(parts[:i]) or "<root>"
            valid = sorted(str(k) for k in node.keys())
            close = difflib.get_close_matches(part, valid, n=1)
            hint = f" Did you mean '{'.'.join(parts[:i] + [close[0]])}'?" if close else ""
            return (f"Unknown config key '{key}'.{hint}\n  valid keys under {parent}: {', '.join(valid)}\n"
                    f"  (to add a new key on purpose, write +{key}=...)")
        child = node._get_node(part)  # the node itself: never resolves interpolations such as ${bundled:...}
        if not isinstance(child, DictConfig):
            return None  # reached a leaf (or an interpolation): the key exists
        node = child
    return None


def check_overrides(config_dir: str, config_name: str, overrides: list[str]) -> str | None:
    """Compose with the group choices only, then check every plain `key=value` override's key."""
    import os

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:
        return None  # malformed overrides: Hydra reports them itself
    groups, plain = [], []
    for raw, o in zip(overrides, parsed):
        key = o.key_or_group
        is_group = os.path.isdir(os.path.join(config_dir, *key.split("/")))
        if o.is_add() or o.is_delete() or o.is_force_add() or key.startswith("hydra") or is_group:
            groups.append(raw)
        else:
            plain.append(key)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=groups)
    except Exception:
        return None  # an unknown group option etc.: Hydra's own message lists the available options
    finally:
        GlobalHydra.instance().clear()
    for key in plain:
        try:
            msg = unknown_key_message(cfg, key)
        except Exception:  # advice only: never block a run on a config the check cannot walk
            msg = None
        if msg:
            return msg
    return None


def exit_on_unknown_keys(config_name: str) -> None:
    """For entry points: check `sys.argv`'s overrides against configs/<config_name>.yaml; exit with the message."""
    import os
    import sys

    config_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    overrides = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    problem = check_overrides(config_dir, config_name, overrides)
    if problem:
        sys.exit(problem)


# Renamed config keys, per command: {old: new}. `*` stands for one dotted segment (an eval set's name), and a key
# under a renamed one is renamed with it (`tasks.qa.loss.x` -> `record_kinds.qa.loss.x`). The old spelling keeps
# working for one release (0.2), with a warning: on the command line, and in a user's own task YAML (see
# `migrate_renamed_keys`). Configs in this repository use the new names. See README "Renamed settings".
_RECIPE_KEYS = {"task_label": "recipe_name", "task_metric": "recipe_metric", "tasks": "record_kinds",
                "task_name": "command_name"}
DEPRECATED_KEYS = {
    "train": {**_RECIPE_KEYS, "default_task": "default_record_kind", "eval.*.task": "eval.*.record_kind",
              "export_default_task": "export_record_kind"},
    "eval": {**_RECIPE_KEYS, "eval_task": "instruction_kind", "instruction_task": "instruction_kind",
             "eval.*.task": "eval.*.record_kind", "index.metric": "index.similarity"},
    "mine": {"eval_data": "input_data", "task": "instruction_kind", "instruction_task": "instruction_kind",
             "index.metric": "index.similarity", "task_name": "command_name"},
    "score": {"eval_data": "input_data", "default_task": "default_record_kind", "task_name": "command_name"},
}


def renamed_key(config_name: str, key: str) -> str | None:
    """The new spelling of dotted `key` for this command, or None when it is not a deprecated one."""
    parts = key.split(".")
    for old, new in DEPRECATED_KEYS.get(config_name, {}).items():
        pattern = old.split(".")
        if len(parts) < len(pattern) or any(p != "*" and p != k for p, k in zip(pattern, parts)):
            continue
        wild = iter(k for p, k in zip(pattern, parts) if p == "*")
        head = [next(wild) if p == "*" else p for p in new.split(".")]
        return ".".join(head + parts[len(pattern):])
    return None


def _warning(old: str, new: str, where: str = "") -> str:
    return (f"warning: `{old}`{where} is deprecated and will be removed in 0.3; use `{new}` (same meaning)")


def rename_deprecated(config_name: str, overrides: list[str]) -> tuple[list[str], list[str]]:
    """`(overrides with old keys renamed, one warning per renamed key)`; `+old=`, `~old` and `old=` are handled."""
    import re

    out, warnings = [], []
    for raw in overrides:
        prefix = raw[:2] if raw.startswith("++") else raw[:1] if raw[:1] in "+~" else ""
        key, sep, value = raw[len(prefix):].partition("=")
        new = renamed_key(config_name, key) if (sep or prefix == "~") else None
        if new:
            warnings.append(_warning(key, new))
            raw = f"{prefix}{new}{sep}{value}"
            key = new
        legacy = re.fullmatch(r"record_kinds\.([^.]+)\.loss\.([a-z_]+)", key) if config_name == "train" else None
        if legacy and sep and prefix == "":  # the old per-kind loss block: set (or add) it; record_kinds folds it in
            warnings.append(f"warning: `{key}` is deprecated and will be removed in 0.3; the kind lists its losses in "
                            f"record_kinds.{legacy.group(1)}.losses (this one is folded into that list)")
            raw = f"++{raw}"
        out.append(raw)
    return out, warnings


def migrate_renamed_keys(cfg: DictConfig, config_name: str) -> list[str]:
    """Move old top-level keys a user's own YAML still sets (e.g. `task_label:`, `tasks:` or an eval set's `task:`
    in configs/task/my_faq.yaml) to their new names, in place; returns one warning per moved key.

    A mapping (`tasks:`) is merged over what the new key already holds (the included task files' kinds)."""
    from omegaconf import OmegaConf, open_dict

    moves = []
    for old in DEPRECATED_KEYS.get(config_name, {}):
        if "." not in old and old in cfg and not _is_unset(cfg, old):  # a schema's deprecated field: None
            moves.append(old)
        elif old.startswith("eval.*.") and isinstance(cfg.get("eval"), DictConfig):
            leaf = old.split(".")[-1]
            moves += [f"eval.{name}.{leaf}" for name, spec in cfg.eval.items()
                      if isinstance(spec, DictConfig) and leaf in spec]
    warnings = []
    with open_dict(cfg):
        for old in moves:
            new = renamed_key(config_name, old)
            parent_key, _, leaf = old.rpartition(".")
            parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
            value = OmegaConf.to_container(parent._get_node(leaf), resolve=False) \
                if isinstance(parent._get_node(leaf), DictConfig) else parent._get_node(leaf)._value()
            new_parent_key, _, new_leaf = new.rpartition(".")
            new_parent = OmegaConf.select(cfg, new_parent_key) if new_parent_key else cfg
            current = new_parent.get(new_leaf) if isinstance(value, dict) else None
            new_parent[new_leaf] = OmegaConf.merge(current, value) if isinstance(current, DictConfig) else value
            del parent[leaf]
            warnings.append(_warning(old, new, " in a config file"))
    return warnings


def _is_unset(cfg: DictConfig, key: str) -> bool:
    node = cfg._get_node(key)
    return not isinstance(node, DictConfig) and node._value() is None


def apply_deprecated_aliases(config_name: str) -> None:
    """For entry points: rewrite `sys.argv`'s deprecated keys to their new names, warning on stderr."""
    import sys

    sys.argv[1:], warnings = rename_deprecated(config_name, sys.argv[1:])
    for w in warnings:
        print(w, file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------------
# values: one pass over the composed config, before any data or model is read
# ---------------------------------------------------------------------------------------------------------------------
# Hand-written because Hydra's structured configs check types but not ranges or choices, and a bad value otherwise
# surfaces deep inside the optimizer, the DataLoader or after training (`__len__() should return >= 0`). A rule
# applies where its key exists in the command's config (train, eval, mine, score share this table).
def _int(lo: int | None = None, hi: int | None = None):
    def check(v):
        return isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo) and (hi is None or v <= hi)
    return check


def _num(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        return (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))
    return check


def _choice(*options):
    return lambda v: v in options


def _optional(check):
    return lambda v: v is None or check(v)


# InfoNCELoss's `directions` (embedder.losses.contrastive.DIRECTIONS, which this layer may not import; a test keeps
# the two equal)
LOSS_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


def _merge_weights(v) -> bool:
    """merge_base_weight: null, one base share in (0, 1), or a list of distinct shares in [0, 1) chosen among on dev."""
    if isinstance(v, (list, tuple, ListConfig)):
        return len(v) > 0 and len(set(v)) == len(v) and all(_num(0, 1, hi_open=True)(x) for x in v)
    return _optional(_num(0, 1, lo_open=True, hi_open=True))(v)


def _directions(v) -> bool:
    names = list(v) if isinstance(v, (list, tuple, ListConfig)) else None
    return (names is not None and "query_to_doc" in names and len(set(names)) == len(names)
            and all(n in LOSS_DIRECTIONS for n in names))


VALUE_RULES: dict[str, tuple] = {  # key -> (check, what is allowed)
    "data.batch_size": (_int(1), "an integer >= 1 (queries per device)"),
    "data.group_size": (_int(1), "an integer >= 1 (1 positive + group_size-1 negatives per query)"),
    "data.num_workers": (lambda v: v == "auto" or _int(0)(v),
                         "auto or an integer >= 0 (DataLoader workers; 0 = in the main process)"),
    "loss.temperature": (_num(0, lo_open=True), "a number > 0 (the InfoNCE temperature tau, e.g. 0.02)"),
    "loss.combine_rule": (_choice("reference", "weighted"), "reference or weighted"),
    "optimizer.lr": (_num(0, lo_open=True), "a number > 0 (e.g. 2e-5)"),
    "warmup_ratio": (_num(0, 1), "a number from 0 to 1 (the share of steps spent warming up)"),
    "weight_decay": (_num(0), "a number >= 0"),
    "query_max_length": (_int(1), "an integer >= 1 (tokens)"),
    "key_max_length": (_int(1), "an integer >= 1 (tokens)"),
    "trainer.max_epochs": (_optional(_int(-1)), "an integer >= 1, or -1 (no limit: max_steps decides)"),
    "trainer.max_steps": (_int(-1), "an integer >= 1, or -1 (no limit: max_epochs decides)"),
    "trainer.accumulate_grad_batches": (_int(1), "an integer >= 1"),
    "model.pooling": (_choice("cls", "mean", "last_token"), "cls, mean or last_token"),
    "model.truncate_dim": (_optional(_int(1)), "null, or an integer >= 1 (leading dimensions kept)"),
    "model.bidirectional": (_choice(None, True, False), "null (as the checkpoint), true or false"),
    "merge_base_weight": (_merge_weights,
                          "null, a number between 0 and 1 (the base model's share of the merged weights), or a list "
                          "of distinct shares from 0 to below 1 to choose among on dev (e.g. [0,0.2])"),
    "loss.gradcache_mini_batch": (_optional(_int(1)), "null, or an integer >= 1 (queries per forward pass)"),
    "loss.mask_duplicate_keys": (_choice(True, False), "true or false"),
    "loss.mask_known_positives": (_choice(True, False), "true or false"),
    "loss.directions": (_directions, "a list of query_to_doc, query_to_query, doc_to_query, doc_to_doc, each once, "
                                     "query_to_doc included (e.g. [query_to_doc,doc_to_query])"),
    "export_state": (_choice("best", "last"), "best or last"),
    "export_lora": (_choice("merged", "adapter"), "merged or adapter"),
    "seed": (_int(0), "an integer >= 0"),
    "hits": (_int(1), "an integer >= 1 (documents retrieved per query)"),
    "max_neg_num": (_int(0), "an integer >= 0"),
    "rank_range_of": (_choice("ranking", "filtered"), "ranking or filtered"),
    "relative_margin": (_optional(_num(0, 1, hi_open=True)), "null, or a number from 0 to below 1"),
    "retriever.batch_size": (_int(1), "an integer >= 1 (texts per forward pass)"),
    "beir.dev_fraction": (_num(0, 1, lo_open=True, hi_open=True), "a number between 0 and 1 (exclusive)"),
    "beir.negatives.hits": (_int(1), "an integer >= 1"),
    "beir.negatives.max_neg_num": (_int(1), "an integer >= 1"),
    "beir.negatives.rank_range_of": (_choice("ranking", "filtered"), "ranking or filtered"),
    "beir.negatives.relative_margin": (_optional(_num(0, 1, hi_open=True)), "null, or a number from 0 to below 1"),
    "beir.teacher.max_candidates": (_int(1), "an integer >= 1"),
}


def check_values(cfg: DictConfig) -> None:
    """Raise one DataError naming the first bad value's key, the value and what is allowed."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from embedder.errors import DataError

    for key, (check, allowed) in VALUE_RULES.items():
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=False)
        except OmegaConfBaseException:
            continue  # an interpolation that needs the running job: checked where it is used
        if value is None and OmegaConf.select(cfg, key, default="__absent__") == "__absent__":
            continue
        if isinstance(value, DictConfig):
            continue
        if not check(value):
            raise DataError(f"config value {key}={value!r} is not allowed", field=key,
                            hint=f"{key} must be {allowed}")
    if OmegaConf.select(cfg, "export_lora", default=None) == "adapter":  # rules across keys
        if not OmegaConf.select(cfg, "model.lora", default=None):
            raise DataError("export_lora=adapter keeps the LoRA adapters, but model.lora is null", field="export_lora",
                            hint="export_lora must be merged without model.lora (or set model.lora={r: 16, ...})")
        if OmegaConf.select(cfg, "model.tie_encoders", default=True) is False:
            # sentence-transformers 6.3 looks for the base model's weights inside the Router's subfolder
            raise DataError("export_lora=adapter is for one shared encoder: sentence-transformers cannot load "
                            "adapters inside a query/document Router", field="export_lora",
                            hint="export_lora must be merged with model.tie_encoders=false")
        if OmegaConf.select(cfg, "model.gguf_file", default=None):
            raise DataError("export_lora=adapter would name a GGUF base model, which sentence-transformers cannot "
                            "load", field="export_lora", hint="export_lora must be merged with model.gguf_file set")
        if OmegaConf.select(cfg, "model.bidirectional", default=None) is not None:
            raise DataError("export_lora=adapter loads the base model's own config, which would lose "
                            "model.bidirectional", field="export_lora",
                            hint="export_lora must be merged with model.bidirectional set")
