"""Mine hard negatives: `python mine.py` (bundled sample), or the reference recipe
`python mine.py retriever=dense data_root=/data/llm-embedder eval_data=llm-embedder:qa/nq/train.json
corpus=llm-embedder:qa/nq/corpus.json save_name=bge`.

Composes the config and hands it to `embedder.mining.run.run_mine`; see configs/mine.yaml for every option.
"""

import os
import sys

import hydra
from omegaconf import DictConfig

from embedder.bundled import register_resolvers
from embedder.config_check import check_overrides
from embedder.mining.run import run_mine

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="mine")
def main(cfg: DictConfig) -> None:
    run_mine(cfg)


if __name__ == "__main__":
    overrides = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    problem = check_overrides(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs"), "mine", overrides)
    if problem:
        sys.exit(problem)
    main()
