"""Mine hard negatives: `python mine.py` (bundled sample), or the reference recipe
`python mine.py retriever=dense data_root=/data/llm-embedder eval_data=llm-embedder:qa/nq/train.json
corpus=llm-embedder:qa/nq/corpus.json save_name=bge`.

Composes the config and hands it to `embedder.mining.run.run_mine`; see configs/mine.yaml for every option.
"""

import hydra
from omegaconf import DictConfig

from embedder.bundled import register_resolvers
from embedder.config_check import exit_on_unknown_keys
from embedder.errors import reported_input_errors
from embedder.mining.run import run_mine

register_resolvers()


@hydra.main(version_base="1.3", config_path="configs", config_name="mine")
def main(cfg: DictConfig) -> None:
    with reported_input_errors():
        run_mine(cfg)


if __name__ == "__main__":
    exit_on_unknown_keys("mine")
    main()
