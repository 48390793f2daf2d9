"""Add LM teacher scores to training files: `python score.py input_data=llm-embedder:qa/msmarco/train.json
data_root=/data/llm-embedder lm=llama2-7b-chat` writes qa/msmarco/train.scored.llama2-7b-chat.json.

Composes the config (`embedder.cli.run_entry`: key check, Hydra, one-line errors) and hands it to
`embedder.scoring.run.run_score`; see configs/score.yaml for every option.
With no arguments it scores a few records of the bundled sample data with the bundled SmolLM2, offline.
"""

from embedder.cli import run_entry

if __name__ == "__main__":
    run_entry("score", "embedder.scoring.run:run_score")  # imported once the config is checked
