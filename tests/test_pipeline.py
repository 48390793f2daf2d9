"""The whole recipe on the bundled sample data: mine negatives -> score them with an LM -> train on the scores."""

from __future__ import annotations

import math

import pytest

from embedder.mining.run import run_mine
from embedder.scoring.run import run_score
from embedder.training import run_train
from tests.conftest import compose, quick_overrides, read_jsonl
from tests.test_train import _metrics_rows


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> str:
    from embedder.scoring.tiny_lm import build_tiny_lm

    return build_tiny_lm(str(tmp_path_factory.mktemp("tiny-lm")))


@pytest.mark.slow
def test_mine_score_train_chain(tmp_path, tiny_bert, tiny_lm):
    # 1. mine: the tiny BERT retrieves from the sample qa corpus; negatives replace the file's own
    mined = run_mine(compose(["model=tiny_bert", f"model.model_name_or_path={tiny_bert}", "trainer=cpu",
                              f"output_dir={tmp_path}/mine", "save_to_output=true", "save_name=tiny",
                              "hits=20", "max_neg_num=6"], config_name="mine"))
    rows = read_jsonl(mined["output"])
    assert rows and all("teacher_scores" not in r and len(r["neg"]) <= 6 for r in rows)
    assert all(not set(r["neg_index"]) & set(r["pos_index"]) for r in rows)

    # 2. score: a tiny random LM writes teacher_scores aligned with pos + neg
    scored = run_score(compose(["lm=tiny", f"lm.model_name_or_path={tiny_lm}", f"input_data=[{mined['output']}]",
                                f"output_dir={tmp_path}/score", "max_records=12"], config_name="score"))
    (out,) = [f["output"] for f in scored["files"]]
    rows = read_jsonl(out)
    assert len(rows) == 12 and all(len(r["teacher_scores"]) == len(r["pos"]) + len(r["neg"]) for r in rows)

    # 3. train: stable distillation (the qa recipe) on the scored file
    cfg = compose(quick_overrides(tmp_path, tiny_bert, ["task=msmarco", f"train_data=[{out}]", "eval=null",
                                                        "trainer.max_steps=3"]))
    run_train(cfg)
    losses = [float(r["train/loss_distill"]) for r in _metrics_rows(tmp_path) if r.get("train/loss_distill")]
    assert losses and all(math.isfinite(x) for x in losses)  # the distillation loss ran on the LM's scores
    assert (tmp_path / "out" / "model.safetensors").exists()
