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
            "data.batch_size=4", "data.group_size=2", "query_max_length=128", "key_max_length=128",
            "task=sample", "train_data=[llm-embedder:tool/train.json]", "eval.qa=null", "eval.convsearch=null",
            "recipe_metric=val/tool/ndcg@5", "callbacks.rich_progress_bar=null", "export=false"]


@pytest.mark.slow
def test_readme_sweep_gives_every_job_its_own_folder_and_resumes_each(tiny_bert, tmp_path):
    """The README's sweep, `python train.py -m task=tool optimizer.lr=1e-5,2e-5 data.group_size=4,8`, with the
    default output_dir (only made small and offline): four jobs, four folders, each with its own checkpoints and
    metrics; the same sweep again with ckpt_path=last resumes every job from its own folder."""
    small = ["model=tiny_bert", f"model.model_name_or_path={tiny_bert}", "trainer=cpu", "trainer.max_steps=2",
             "data.batch_size=2", "query_max_length=128", "key_max_length=128", "train_data=[llm-embedder:tool/train.json]",
             "data_root=${sample_data:}", "eval.tool.eval_data=llm-embedder:tool/test.json",
             "eval.tool.corpus=llm-embedder:tool/corpus.json", "callbacks.rich_progress_bar=null", "export=false",
             "evaluate_before=false"]
    readme = ["-m", "task=tool", "optimizer.lr=1e-5,2e-5", "data.group_size=4,8"]
    _run([*readme, *small], tmp_path)
    jobs = sorted((tmp_path / "outputs" / "train" / "tool" / "multirun").iterdir())
    assert len(jobs) == 4
    import yaml

    cfgs = [yaml.safe_load((j / "config.yaml").read_text()) for j in jobs]
    assert {(c["data"]["group_size"], float(c["optimizer"]["lr"])) for c in cfgs} == \
        {(g, lr) for g in (4, 8) for lr in (1e-5, 2e-5)}
    for j in jobs:
        assert (j / "metrics.json").exists() and (j / "checkpoints" / "last.ckpt").exists()
    assert not (tmp_path / "outputs" / "train" / "tool" / "metrics.json").exists()  # nobody wrote the shared path
    again = _run([*readme, *small, "ckpt_path=last"], tmp_path)
    restored = {line for line in (again.stdout + again.stderr).splitlines() if "Restoring states from" in line}
    assert len(restored) == 4 and all(any(f"multirun/{j.name}/checkpoints" in r for r in restored) for j in jobs)
    assert sorted((tmp_path / "outputs" / "train" / "tool" / "multirun").iterdir()) == jobs


@pytest.mark.slow
def test_optuna_search(tiny_bert, tmp_path):
    _run([*_common(tiny_bert, tmp_path), "hparams_search=optuna", "hydra.sweeper.n_trials=2",
          "hydra.sweeper.sampler.n_startup_trials=2"], tmp_path)
    trials = list((tmp_path / "outputs" / "train").rglob("multirun/*/metrics.json"))
    assert len(trials) == 2  # each trial in its own folder
    (results,) = list((tmp_path / "logs").rglob("optimization_results.yaml"))
    text = results.read_text()
    assert "best_params" in text and "best_value" in text
