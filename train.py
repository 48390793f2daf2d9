"""Fine-tune a task-aware dense retriever: `python train.py task=nq data_root=/data/llm-embedder`.

Composes the config and hands it to `embedder.training.run_train`; see configs/train.yaml for every option.
"""

import hydra
from omegaconf import DictConfig

from embedder.bundled import register_resolvers
from embedder.config_check import exit_on_unknown_keys
from embedder.errors import reported_input_errors
from embedder.training import run_train

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with reported_input_errors():
        metrics = run_train(cfg)
    # a sweeper (hydra-optuna-sweeper) optimises the returned value
    return metrics.get(cfg.optimized_metric) if cfg.optimized_metric else None


if __name__ == "__main__":
    exit_on_unknown_keys("train")
    main()
