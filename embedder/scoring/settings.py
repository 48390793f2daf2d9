"""Scoring settings: `ScoreSettings` (the one place the scoring defaults live; `configs/score.yaml` states the same
values and a test checks they agree), resolved from the Hydra config, and the scorer they build.

`ScoreConfig` is the structured config (Hydra's ConfigStore, name `score_schema`) that `configs/score.yaml` extends:
Hydra checks the YAML, a user's `local` overrides and the command line against its keys and types when it composes
(`batch_size=abc` or a misspelt key in a YAML file is one error before anything loads). Its defaults are
ScoreSettings'.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from embedder.paths import resolve_files
from embedder.scoring.lm_scorer import BATCH_SIZE, KEY_MAX_LENGTH, MAX_TOKENS_PER_BATCH

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
    key_max_length: int | None = KEY_MAX_LENGTH
    max_candidates: int | None = None
    max_records: int | None = None
    batch_size: int = BATCH_SIZE
    max_tokens_per_batch: int | None = MAX_TOKENS_PER_BATCH
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


_D = {name: f.default for name, f in ScoreSettings.__dataclass_fields__.items()}


@dataclass
class SampleConfig:
    """`sample:` in score.yaml: what `python score.py` with no input_data scores."""

    files: list[str] = field(default_factory=list)
    data_root: str | None = None
    output_dir: str | None = None
    max_records: int | None = None
    max_candidates: int | None = None


@dataclass
class ScoreConfig:
    """The schema of configs/score.yaml (one-line meanings are there). `lm` and `templates` are config groups whose
    keys the run checks itself (LM_KEYS, templates.py); the three deprecated spellings are accepted for one release
    (config_check.DEPRECATED_KEYS moves them)."""

    lm: dict[str, Any] = field(default_factory=dict)
    templates: dict[str, Any] = field(default_factory=dict)
    command_name: str = "score"
    input_data: Any = None  # a path, a glob or a list of them
    data_root: str | None = None
    output_dir: str | None = None
    save_name: str | None = None
    default_record_kind: str | None = None
    seed: int = _D["seed"]
    normalize: str = _D["normalize"]
    answer_choice: str = _D["answer_choice"]
    key_max_length: int | None = _D["key_max_length"]
    max_candidates: int | None = _D["max_candidates"]
    skip_bad_records: bool = _D["skip_bad_records"]
    max_records: int | None = _D["max_records"]
    batch_size: int = _D["batch_size"]
    max_tokens_per_batch: int | None = _D["max_tokens_per_batch"]
    packed: str = _D["packed"]  # auto, true or false (a YAML bool is read as "True"/"False")
    part_size: int = _D["part_size"]
    num_shards: int = _D["num_shards"]
    shard_id: int = _D["shard_id"]
    devices: int = _D["devices"]
    keep_parts: bool = _D["keep_parts"]
    overwrite: bool = _D["overwrite"]
    dry_run: bool = _D["dry_run"]
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval_data: Any = None  # deprecated: input_data
    default_task: str | None = None  # deprecated: default_record_kind
    task_name: str | None = None  # deprecated: command_name


def settings_from_cfg(cfg: DictConfig) -> ScoreSettings:
    """Resolve the Hydra config into ScoreSettings; `input_data: null` means the bundled sample (cfg.sample)."""
    c = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
         for k, v in ((k, cfg[k]) for k in cfg if k != "hydra")}  # the hydra node needs a running job to resolve
    sample = c.get("sample") or {}
    use_sample = c.get("input_data") is None
    data_root = sample.get("data_root") if use_sample else c.get("data_root")
    raw_files = sample.get("files") if use_sample else c["input_data"]
    if not raw_files:
        raise ValueError("nothing to score: set input_data=<file or glob> (and data_root for `llm-embedder:` paths)")
    files = resolve_files(raw_files, data_root, what="input_data")
    pick = (lambda k: c.get(k) if c.get(k) is not None else sample.get(k)) if use_sample else c.get
    # every key is present: score_schema (ScoreConfig, whose defaults are ScoreSettings') fills what YAML leaves out
    lm = {k: v for k, v in (c.get("lm") or {}).items() if k in LM_KEYS}
    unknown = set(c.get("lm") or {}) - set(LM_KEYS)
    if unknown:
        raise ValueError(f"lm config has unknown keys {sorted(unknown)}; allowed: {', '.join(LM_KEYS)}")
    if not lm.get("model_name_or_path"):
        raise ValueError("lm.model_name_or_path is not set; pick an lm config, e.g. lm=smollm2 or lm=llama2-7b-chat")
    s = ScoreSettings(
        files=files, lm=lm, templates=c.get("templates") or {}, save_name=str(c.get("save_name") or lm.get("name")),
        output_dir=pick("output_dir"), data_root=data_root, task=c.get("default_record_kind"), seed=int(c["seed"]),
        normalize=c["normalize"], answer_choice=c["answer_choice"],
        key_max_length=c["key_max_length"], max_candidates=pick("max_candidates"), max_records=pick("max_records"),
        batch_size=int(c["batch_size"]), max_tokens_per_batch=c["max_tokens_per_batch"],
        packed=str(c["packed"]).lower(), skip_bad_records=bool(c["skip_bad_records"]), part_size=int(c["part_size"]),
        num_shards=int(c["num_shards"]), shard_id=int(c["shard_id"]), devices=int(c["devices"]),
        keep_parts=bool(c["keep_parts"]), overwrite=bool(c["overwrite"]), dry_run=bool(c["dry_run"]))
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


def build_scorer(s: ScoreSettings, load_model: bool = True):
    from embedder.scoring.lm_scorer import LMScorer

    return LMScorer(**s.lm, key_max_length=s.key_max_length, normalize=s.normalize, batch_size=s.batch_size,
                    max_tokens_per_batch=s.max_tokens_per_batch, packed=s.packed, load_model=load_model)
