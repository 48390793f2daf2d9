"""Shared fixtures: a tiny random BERT (no download), toy data in the reference's formats, Hydra config composition."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOY_FILES = ["qa", "convsearch", "chat", "lrlm", "icl", "tool"]
TOY_RECORDS = 8  # records per task, as many as the reference's toy files (research/llm_embedder/data/toy) hold

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# index caches (embedder.data.index_cache) go to a fresh folder per test session, never the user's ~/.cache
os.environ["EMBEDDER_CACHE"] = tempfile.mkdtemp(prefix="embedder-test-cache-")


def read_jsonl(path) -> list[dict]:
    """Every record of a small JSON-lines file (the package reads large ones lazily: embedder.data.jsonl)."""
    import json

    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


_TOY_DIR = Path(tempfile.mkdtemp(prefix="embedder-test-toy-"))


def toy_path(name: str) -> str:
    """A toy training file in the reference's format for task family `name` (qa, convsearch, chat, lrlm, icl, tool):
    the first 8 records of the bundled sample data's `<name>/train.json`, which has the reference toy files' fields
    (pos/neg texts, pos_index/neg_index, teacher_scores, answers, history, task). Generated, so every clone runs the
    tests that use it; the reference's own toy files are not needed."""
    path = _TOY_DIR / f"{name}.json"
    if not path.exists():
        src = ROOT / "embedder" / "sample_data" / name / "train.json"
        with open(src) as f:
            lines = [line for line in f if line.strip()][:TOY_RECORDS]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(lines))
        tmp.replace(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    from embedder.modeling.tiny import build_tiny_bert

    return build_tiny_bert(str(tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture
def attention_step(monkeypatch):
    """`step(model_path, texts, pooling, unpadded, checkpointing, loss)`: one training step (forward and backward) of a
    DualEncoder with attention dropout 0.3, counting calls to torch's `scaled_dot_product_attention`. Returns the
    embeddings, the parameters' gradients, the calls in forward, the calls in the whole step and the layer count:
    how many attention forwards a step computes, with and without gradient checkpointing."""
    import torch

    from embedder.modeling.encoder import DualEncoder

    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls: list[int] = []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append(1) or sdpa(*args, **kwargs))

    def step(model_path, texts, pooling, unpadded, checkpointing, loss):
        torch.manual_seed(0)
        enc = DualEncoder(model_path, pooling=pooling, unpadded=unpadded, attention_dropout=0.3,
                          gradient_checkpointing=checkpointing)
        enc.train()
        batch = dict(enc.tokenizer(texts, padding=True, return_tensors="pt"))
        calls.clear()
        torch.manual_seed(5)
        emb = enc.encode(batch, "key")  # (N, d)
        forward_calls = len(calls)
        loss(emb).backward()
        grads = {n: p.grad for n, p in enc.named_parameters() if p.grad is not None}
        return emb.detach(), grads, forward_calls, len(calls), enc.query_model.config.num_hidden_layers

    return step


def compose(overrides: list[str], config_name: str = "train"):
    """Compose the real Hydra config (with the hydra node, like `@hydra.main`)."""
    from hydra.core.global_hydra import GlobalHydra

    from embedder.config import compose as compose_config

    GlobalHydra.instance().clear()
    cfg = compose_config(config_name, overrides, return_hydra_config=True)
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    return cfg


def quick_overrides(tmp_path, tiny_bert: str, extra: list[str] = ()) -> list[str]:
    """Overrides for a seconds-long CPU fit with the tiny model."""
    return [
        "model=tiny_bert", f"model.model_name_or_path={tiny_bert}", "trainer=cpu", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
        "trainer.max_epochs=-1", "logger=csv", f"output_dir={tmp_path}/out", "data.batch_size=2",
        "data.group_size=4",
        # 128: the tiny tokenizer makes one token per character, and the tasks' instructions alone are up to 68
        # characters: at 32 every query and key of an instructed task would be the same truncated instruction
        "query_max_length=128", "key_max_length=128", "callbacks.rich_progress_bar=null",
        *extra,
    ]
