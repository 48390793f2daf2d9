"""Fine-tune a task-aware dense retriever: `python train.py task=nq data_root=/data/llm-embedder`.

Composes the config and hands it to `embedder.training.run_train`; see configs/train.yaml for every option.
"""

import os
import sys

import hydra
from omegaconf import DictConfig

from embedder.bundled import register_resolvers
from embedder.config_check import check_overrides
from embedder.training import run_train

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = run_train(cfg)
    # a sweeper (hydra-optuna-sweeper) optimises the returned value
    return metrics.get(cfg.optimized_metric) if cfg.optimized_metric else None


if __name__ == "__main__":
    overrides = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    problem = check_overrides(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs"), "train", overrides)
    if problem:
        sys.exit(problem)
    main()
