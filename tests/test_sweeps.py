"""`python train.py -m` multiruns and the Optuna search, run as a user would (subprocess)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _run(args, tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _common(tiny_bert, tmp_path):
    return ["model=tiny_bert", f"model.model_name_or_path={tiny_bert}", "trainer=cpu", "trainer.max_steps=2",
            "data.batch_size=4", "data.group_size=2", "query_max_length=32", "key_max_length=32",
            "task=sample", "train_data=[llm-embedder:tool/train.json]", "eval.qa=null", "eval.convsearch=null",
            "task_metric=val/tool/ndcg@5", "callbacks.rich_progress_bar=null", "export=false",
            f"output_dir={tmp_path}/out/${{hydra:job.num}}"]


@pytest.mark.slow
def test_multirun_grid(tiny_bert, tmp_path):
    _run(["-m", *_common(tiny_bert, tmp_path), "optimizer.lr=1e-5,1e-4"], tmp_path)
    assert (tmp_path / "out" / "0" / "metrics.json").exists() and (tmp_path / "out" / "1" / "metrics.json").exists()


@pytest.mark.slow
def test_optuna_search(tiny_bert, tmp_path):
    _run([*_common(tiny_bert, tmp_path), "hparams_search=optuna", "hydra.sweeper.n_trials=2",
          "hydra.sweeper.sampler.n_startup_trials=2"], tmp_path)
    (results,) = list((tmp_path / "logs").rglob("optimization_results.yaml"))
    text = results.read_text()
    assert "best_params" in text and "best_value" in text
