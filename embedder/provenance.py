"""What a result was made with: the code's git commit and the versions of the packages that decide the numbers.

One function for every output that records it: training runs (`describe_run`, logged and written into the model
card) and LM scoring (each scored file's `.meta.json`).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
from typing import Any

PACKAGES = ("embedder", "torch", "transformers", "lightning", "sentence-transformers", "faiss-cpu", "deepspeed")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_provenance(packages: tuple[str, ...] = PACKAGES) -> dict[str, Any]:
    """`{"git_commit", "git_dirty", "versions"}`: the checkout's HEAD (None outside a git checkout, e.g. a wheel),
    whether tracked files differ from it, and the installed version of each package (absent ones left out)."""
    commit = dirty = None
    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        if commit:
            dirty = bool(subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                                        capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {}
    for pkg in packages:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"git_commit": commit, "git_dirty": dirty, "versions": versions}


def describe_run(cfg: Any, datamodule: Any = None) -> dict[str, Any]:
    """What the loggers record about a training run: the resolved config, the training files with their record
    counts, and `code_provenance()` under `run`."""
    from omegaconf import OmegaConf

    try:
        config = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that needs a running Hydra job (compose API in notebooks and tests)
        config = OmegaConf.to_container(cfg, resolve=False)
    files = {f.path: len(f.records) for f in (getattr(datamodule, "files", None) or [])}
    return {**config, "run": {**code_provenance(), "train_records": files}}
