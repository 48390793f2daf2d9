"""Fine-tune a task-aware dense retriever: `python train.py task=nq data_root=/data/llm-embedder`.

Composes the config (`embedder.cli.run_entry`: key check, Hydra, one-line errors) and hands it to
`embedder.training.run_train`; see configs/train.yaml for every option.
"""

from embedder.cli import run_entry

if __name__ == "__main__":
    run_entry("train", "embedder.training:run_train")  # imported once the config is checked
