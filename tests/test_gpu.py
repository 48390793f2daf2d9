"""GPU-only checks: bf16 mixed precision, DeepSpeed ZeRO stages, GPU encoding. Skipped without CUDA."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from embedder.training import run_train
from tests.conftest import compose, quick_overrides

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")

SAMPLE_TOOL = ["task=tool", "data_root=${sample_data:}", "train_data=[llm-embedder:tool/train.json]", "eval=null"]


def _fit(tmp_path, tiny_bert, extra):
    cfg = compose(quick_overrides(tmp_path, tiny_bert, [*SAMPLE_TOOL, "trainer.max_steps=3", *extra]))
    run_train(cfg)
    return tmp_path / "out"


def test_bf16_mixed_fit_and_export(tmp_path, tiny_bert):
    from sentence_transformers import SentenceTransformer

    out = _fit(tmp_path, tiny_bert, ["trainer=gpu", "trainer.precision=bf16-mixed"])
    st = SentenceTransformer(str(out), device="cuda")
    assert torch.isfinite(st.encode(["hello"], convert_to_tensor=True)).all()


def test_fp16_mixed_fit(tmp_path, tiny_bert):
    _fit(tmp_path, tiny_bert, ["trainer=gpu", "trainer.precision=16-mixed"])


def test_bf16_eval_on_gpu(tmp_path, tiny_bert):
    cfg = compose(quick_overrides(tmp_path, tiny_bert, [
        "task=sample", "trainer=gpu", "trainer.max_steps=2", "data.batch_size=4"]))
    after = run_train(cfg)
    assert "val/qa/ndcg@10" in after


@needs_deepspeed
@pytest.mark.parametrize("stage", ["deepspeed_stage_0", "deepspeed_stage_2", "deepspeed_stage_3"])
def test_deepspeed_stages(stage, tmp_path, tiny_bert):
    from sentence_transformers import SentenceTransformer

    out = _fit(tmp_path, tiny_bert, [f"trainer={stage}", "trainer.devices=1", "trainer.precision=bf16-mixed"])
    st = SentenceTransformer(str(out), device="cuda")  # ZeRO-3 weights were gathered before export
    emb = st.encode(["a tool that books flights"], convert_to_tensor=True)
    assert emb.shape == (1, 32) and torch.isfinite(emb).all()


def test_gpu_encoding_matches_cpu(tiny_bert):
    from embedder.modeling import DualEncoder

    enc = DualEncoder(tiny_bert, attn_implementation="sdpa")
    texts = ["short", "a somewhat longer text about retrieval", "x " * 40]
    cpu = enc.encode_texts(texts, max_length=64)
    gpu = enc.to("cuda").encode_texts(texts, max_length=64)
    assert torch.allclose(cpu, gpu, atol=1e-4)


@needs_deepspeed
def test_zero3_in_training_evaluation(tmp_path, tiny_bert):
    """In-training evaluation under ZeRO-3: the encoder's weights are partitioned, so the stores are neither keyed by
    a weight hash nor cached, and are deleted once scored; the metrics come out before and after training."""
    import json
    import math
    import os

    cfg = compose(quick_overrides(tmp_path, tiny_bert, [
        "task=sample", "train_data=[llm-embedder:tool/train.json]", "eval.qa=null", "eval.convsearch=null",
        "task_metric=val/tool/ndcg@5", "trainer=deepspeed_stage_3", "trainer.devices=1",
        "trainer.precision=bf16-mixed", "trainer.max_steps=2", "+eval.tool.shard_size=50"]))
    after = run_train(cfg)
    before = json.load(open(tmp_path / "out" / "metrics.json"))["before"]
    assert before.keys() == after.keys() and "val/tool/ndcg@5" in after
    assert all(math.isfinite(v) for v in [*before.values(), *after.values()])
    assert not os.listdir(tmp_path / "out" / "eval-encode")  # every store was removed after scoring
