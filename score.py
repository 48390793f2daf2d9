"""Add LM teacher scores to training files: `python score.py eval_data=llm-embedder:qa/msmarco/train.json
data_root=/data/llm-embedder lm=llama2-7b-chat` writes qa/msmarco/train.scored.llama2-7b-chat.json.

Composes the config and hands it to `embedder.scoring.run.run_score`; see configs/score.yaml for every option.
With no arguments it scores a few records of the bundled sample data with the bundled SmolLM2, offline.
"""

import hydra
from omegaconf import DictConfig

from embedder.bundled import register_resolvers
from embedder.config_check import exit_on_unknown_keys
from embedder.errors import reported_input_errors
from embedder.scoring.run import run_score

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="score")
def main(cfg: DictConfig) -> None:
    with reported_input_errors():
        run_score(cfg)


if __name__ == "__main__":
    exit_on_unknown_keys("score")
    main()
