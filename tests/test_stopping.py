"""SIGTERM (kill <pid>, SLURM or Kubernetes preemption) stops a command within seconds at any phase, evaluation
included, with one line and exit status 143, leaving nothing that blocks a rerun; a benchmark whose child dies
fails with the child's status instead of hanging."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_sigterm_during_the_evaluation_stops_within_seconds_and_a_rerun_finishes(tmp_path, tiny_bert):
    cache = tmp_path / "cache"
    cmd = [sys.executable, "train.py", "model=tiny_bert", f"model.model_name_or_path={tiny_bert}", "trainer=cpu",
           "trainer.max_steps=2", "trainer.max_epochs=-1", "eval.tool=null", "eval.convsearch=null",
           "+eval.qa.batch_tokens=16", "+eval.qa.batch_size=1",  # one passage per forward: a long evaluation
           "query_max_length=128", "key_max_length=128", "data.batch_size=2", "logger=csv", "report=false",
           f"output_dir={tmp_path}/out", f"hydra.run.dir={tmp_path}/hydra", "callbacks.rich_progress_bar=null"]
    env = {**os.environ, "EMBEDDER_CACHE": str(cache), "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stores = cache / "eval-encode"
    deadline = time.monotonic() + 240
    while not (stores.is_dir() and any(stores.iterdir())) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the before-training evaluation has created its stores: it is encoding now
    assert proc.poll() is None, "the run ended before its evaluation could be interrupted"
    time.sleep(1.0)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("SIGTERM during the evaluation did not stop train.py within 30 s")
    took = time.monotonic() - sent
    assert proc.returncode == 143, f"exit {proc.returncode}:\n{err[-3000:]}"
    assert "Traceback" not in err and "stopped on SIGTERM" in err, err[-3000:]
    assert took < 15, f"stopped {took:.1f} s after SIGTERM"
    assert not (tmp_path / "out" / "model.safetensors").exists()  # nothing exported from an unfinished run
    slow = ("+eval.qa.batch_tokens=16", "+eval.qa.batch_size=1")  # the rerun batches as usual: same embeddings' rows
    rerun = subprocess.run([c for c in cmd if c not in slow], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]  # finished shards were reused, nothing partial was in the way
    assert (tmp_path / "out" / "model.safetensors").exists()


def _dies(side, args, q):  # a side's child that is killed before it reports (as the OOM killer does)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_benchmark_whose_side_dies_fails_with_its_status_instead_of_hanging():
    import multiprocessing as mp

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from train_throughput import side_result

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=_dies, args=("embedder", {}, q))
    proc.start()
    start = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        side_result("embedder", proc, q)
    assert "killed by signal 9" in str(stop.value) and "embedder" in str(stop.value)
    assert time.monotonic() - start < 10
