"""Multi-node, rehearsed on one machine: `torchrun --nnodes 2 --nproc_per_node 1` as two node agents on localhost
(gloo, a c10d rendezvous), as SLURM or Kubernetes would start them on two hosts. Two training steps export the same
weights as one process with the same global batch (cross-device negatives make the two ranks' loss the one
process's loss). The comparison uses SGD: Adam's first step is lr * g / (|g| + eps), which turns the float
summation noise of near-zero gradients (two processes add in another order) into full +-lr steps."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, toy_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_dropout_tiny_bert(tiny_bert: str, out: str) -> str:
    """The tiny model without dropout: each process draws its own dropout masks, which would make the runs differ."""
    shutil.copytree(tiny_bert, out)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
    return out


@pytest.mark.slow
def test_two_node_agents_on_localhost_train_like_one_process(tmp_path, tiny_bert):
    from safetensors.torch import load_file

    model = _no_dropout_tiny_bert(tiny_bert, str(tmp_path / "model"))
    common = ["task=tool", f"train_data=[{toy_path('tool')}]", "eval=null", "model=tiny_bert",
              f"model.model_name_or_path={model}", "trainer.max_steps=2", "trainer.max_epochs=-1",
              "query_max_length=128", "key_max_length=128", "data.group_size=4", "data.num_workers=0",
              "optimizer._target_=torch.optim.SGD", "~optimizer.betas", "~optimizer.eps", "optimizer.lr=1.0",
              "logger=csv", "report=false", "evaluate_before=false",
              "callbacks.rich_progress_bar=null"]
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "EMBEDDER_CACHE": str(tmp_path / "cache")}
    one = subprocess.run([sys.executable, "train.py", *common, "trainer=cpu", "data.batch_size=4",
                          f"output_dir={tmp_path}/one", f"hydra.run.dir={tmp_path}/hydra-one"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]

    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    port = _free_port()
    agents = [subprocess.Popen(
        [torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
         "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "embedder-multinode-test", "train.py", *common,
         "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2",
         "trainer.precision=32-true", "data.batch_size=2", f"output_dir={tmp_path}/two",
         f"hydra.run.dir={tmp_path}/hydra-two-{node}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in range(2)]
    logs = []
    for agent in agents:
        try:
            out, _ = agent.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for a in agents:
                a.kill()
            pytest.fail("the two node agents did not finish in 10 minutes")
        logs.append(out)
        assert agent.returncode == 0, out[-3000:]
    for node in range(2):  # one rank per agent, in one world of two
        with open(tmp_path / f"hydra-two-{node}" / "train.log") as f:
            assert "batch 2 per device x 2 devices" in f.read()

    single, multi = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(
        str(tmp_path / "two" / "model.safetensors"))
    base = load_file(os.path.join(model, "model.safetensors"))
    assert single.keys() == multi.keys()
    moved = [k for k in single if k in base and not torch.allclose(single[k], base[k], atol=1e-4)]
    assert moved, "training changed nothing: the comparison would be empty"
    for k in single:
        torch.testing.assert_close(multi[k], single[k], atol=2e-5, rtol=1e-4, msg=k)
    ckpt = torch.load(tmp_path / "two" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
