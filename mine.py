"""Mine hard negatives: `python mine.py` (bundled sample), or the reference recipe
`python mine.py retriever=dense data_root=/data/llm-embedder input_data=llm-embedder:qa/nq/train.json
corpus=llm-embedder:qa/nq/corpus.json save_name=bge`.

Composes the config (`embedder.cli.run_entry`: key check, Hydra, one-line errors) and hands it to
`embedder.mining.run.run_mine`; see configs/mine.yaml for every option.
"""

from embedder.cli import run_entry

if __name__ == "__main__":
    run_entry("mine", "embedder.mining.run:run_mine")  # imported once the config is checked
