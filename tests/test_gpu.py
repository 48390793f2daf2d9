"""GPU-only checks: bf16 mixed precision, DeepSpeed ZeRO stages, GPU encoding. Skipped without CUDA."""

from __future__ import annotations

import importlib.util
import os

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
    """Each ZeRO stage trains and exports the weights it trained: the export equals, in bf16 (the module's own
    precision under DeepSpeed bf16), the weights of the run's last DeepSpeed checkpoint: gathered from the
    partitions (zero_to_fp32) for stages 2 and 3, the module states for stage 0. Not just some finite model."""
    import glob

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    out = _fit(tmp_path, tiny_bert, [f"trainer={stage}", "trainer.devices=1", "trainer.precision=bf16-mixed"])
    st = SentenceTransformer(str(out), device="cuda")  # ZeRO-3 weights were gathered before export
    emb = st.encode(["a tool that books flights"], convert_to_tensor=True)
    assert emb.shape == (1, 32) and torch.isfinite(emb).all()
    ckpt = str(out / "checkpoints" / "last.ckpt")
    if stage == "deepspeed_stage_0":
        (states,) = glob.glob(os.path.join(ckpt, "**", "mp_rank_00_model_states.pt"), recursive=True)
        gathered = torch.load(states, map_location="cpu", weights_only=False)["module"]
    else:
        gathered = get_fp32_state_dict_from_zero_checkpoint(ckpt)
    gathered = {k.removeprefix("_forward_module."): v for k, v in gathered.items()}
    exported = load_file(str(out / "model.safetensors"))
    prefix = "encoder.query_model."
    trained = {k[len(prefix):]: v for k, v in gathered.items() if k.startswith(prefix)}
    common = [k for k in exported if k in trained]
    assert len(common) == len(exported), sorted(set(exported) - set(trained))[:5]
    for k in common:
        assert torch.equal(exported[k].to(torch.bfloat16), trained[k].to(torch.bfloat16)), k


@needs_deepspeed
def test_lora_under_deepspeed_stage_2(tmp_path, tiny_bert):
    """LoRA with ZeRO-2 (bf16): the adapters train, the export is a plain model (adapters merged) that differs from
    the base in the adapted projections only."""
    from safetensors.torch import load_file

    out = _fit(tmp_path, tiny_bert, ["trainer=deepspeed_stage_2", "trainer.devices=1", "trainer.precision=bf16-mixed",
                                     "model.lora={r:4,alpha:8,dropout:0.0,target_modules:[query,value]}",
                                     "optimizer.lr=1e-2"])
    exported, base = load_file(str(out / "model.safetensors")), load_file(f"{tiny_bert}/model.safetensors")
    q = next(k for k in exported if k.endswith("attention.self.query.weight"))
    kk = next(k for k in exported if k.endswith("attention.self.key.weight"))
    assert not torch.equal(exported[q].float(), base[q].float()) and torch.equal(exported[kk].float(), base[kk].float())


@pytest.mark.parametrize("bidirectional", [False, True])
def test_decoder_varlen_kernel_matches_padded_sdpa_in_bf16(tmp_path, bidirectional, monkeypatch):
    """A Llama-style decoder (head dim 64, grouped-query attention) packed through the CUDA varlen kernel against
    padded SDPA under bf16 autocast, causal and bidirectional, last-token pooling. The kernel must run, not the
    grouped fallback: fp32 weights under autocast give fp32 rotary q/k, which once missed it (3.5x slower)."""
    from transformers import LlamaConfig, LlamaModel

    from embedder.modeling import DualEncoder, unpadded
    from embedder.scoring.tiny_lm import build_tiny_tokenizer

    torch.manual_seed(0)
    path = str(tmp_path / "llama-h256")
    tok = build_tiny_tokenizer()
    LlamaModel(LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    assert unpadded.kernel_available("cuda")
    encoders = {name: DualEncoder(path, pooling="last_token", unpadded=mode, bidirectional=bidirectional).cuda().eval()
                for name, mode in (("padded", "false"), ("packed", "auto"))}
    texts = ["a", "dense retrieval for language models " * 6, "x y", "the quick brown fox " * 20]
    batch = {k: v.cuda() for k, v in encoders["padded"].tokenizer(texts, padding=True, return_tensors="pt").items()}

    def no_fallback(*a, **kw):
        raise AssertionError("the grouped padded fallback ran on CUDA under bf16 autocast")

    monkeypatch.setattr(unpadded, "grouped_padded_attention", no_fallback)
    out = {}
    for name, enc in encoders.items():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert enc._run_packed(enc.key_model, torch.device("cuda")) == (name == "packed")
            out[name] = enc.encode(dict(batch), "key").float()
    cos = torch.nn.functional.cosine_similarity(out["packed"], out["padded"], dim=-1)
    assert cos.min() > 0.999, cos


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
        "recipe_metric=val/tool/ndcg@5", "trainer=deepspeed_stage_3", "trainer.devices=1",
        "trainer.precision=bf16-mixed", "trainer.max_steps=2", "+eval.tool.shard_size=50"]))
    after = run_train(cfg)
    before = json.load(open(tmp_path / "out" / "metrics.json"))["before"]
    assert before.keys() == after.keys() and "val/tool/ndcg@5" in after
    assert all(math.isfinite(v) for v in [*before.values(), *after.values()])
    assert not os.path.exists(tmp_path / "out" / "eval-encode")  # every trained store was removed at the end


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_varlen_kernel_matches_padded_sdpa_in_bf16(tiny_bert, tmp_path, pooling):
    """The CUDA variable-length kernel (packed) against padded SDPA, both under bf16 autocast: embeddings and
    gradients, on a bert-like model with head dim 64 and very different lengths in one batch."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from embedder.modeling import DualEncoder, unpadded

    torch.manual_seed(0)
    path = str(tmp_path / "bert-h256")
    BertModel(BertConfig(vocab_size=AutoTokenizer.from_pretrained(tiny_bert).vocab_size, hidden_size=256,
                         num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(path)
    assert unpadded.kernel_available("cuda")
    padded = DualEncoder(path, pooling=pooling, unpadded="false").cuda().eval()
    packed = DualEncoder(path, pooling=pooling, unpadded="auto").cuda().eval()
    packed.load_state_dict(padded.state_dict())
    texts = ["a", "dense retrieval for language models " * 6, "x y", "the quick brown fox " * 20]
    batch = {k: v.cuda() for k, v in padded.tokenizer(texts, padding=True, return_tensors="pt").items()}
    out = {}
    for name, enc in (("padded", padded), ("packed", packed)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert enc._run_packed(enc.key_model, torch.device("cuda")) == (name == "packed")
            emb = enc.encode(dict(batch), "key")
        (emb.float() * torch.arange(emb.shape[1], device="cuda")).sum().backward()
        grad = enc.key_model.encoder.layer[0].attention.self.query.weight.grad.float()
        out[name] = (emb.float(), grad)
    cos = torch.nn.functional.cosine_similarity(out["packed"][0], out["padded"][0], dim=-1)
    assert cos.min() > 0.999, cos
    g_cos = torch.nn.functional.cosine_similarity(out["packed"][1].flatten(), out["padded"][1].flatten(), dim=0)
    assert g_cos > 0.99, g_cos
    # and against the exact fp32 CPU padded encoder
    ref = DualEncoder(path, pooling=pooling, unpadded="false").eval()
    ref.load_state_dict({k: v.cpu() for k, v in padded.state_dict().items()})
    with torch.no_grad():
        exact = ref.encode({k: v.cpu() for k, v in batch.items()}, "key")
    assert torch.nn.functional.cosine_similarity(out["packed"][0].detach().cpu(), exact, dim=-1).min() > 0.999


def test_bf16_unpadded_fit(tmp_path, tiny_bert, monkeypatch):
    """train.py on the GPU with the default model.unpadded=auto, bf16-mixed and gradient checkpointing: the packed
    path runs the CUDA varlen kernel (not the padded fallback), and the export is written."""
    from embedder.modeling import unpadded

    assert unpadded.kernel_available("cuda"), "no varlen kernel (torch varlen_attn or flash-attn) on this GPU"
    calls = {"kernel": 0, "fallback": 0}
    real_kernel, real_fallback = unpadded._torch_varlen(), unpadded.grouped_padded_attention
    flash = unpadded._flash_attn()

    def counted(name, fn):
        def run(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return run

    if flash is not None:
        monkeypatch.setattr(unpadded, "_flash_attn", lambda: counted("kernel", flash))
    else:
        monkeypatch.setattr(unpadded, "_torch_varlen", lambda: counted("kernel", real_kernel))
    monkeypatch.setattr(unpadded, "grouped_padded_attention", counted("fallback", real_fallback))
    out = _fit(tmp_path, tiny_bert, ["trainer=gpu", "trainer.precision=bf16-mixed", "model.gradient_checkpointing=true"])
    assert os.path.isfile(os.path.join(str(out), "config.json"))
    assert calls["kernel"] > 0 and calls["fallback"] == 0, calls


@pytest.mark.parametrize("factory,params", [("Flat", {}), ("IVF64,Flat", {"nprobe": 8})])
def test_gpu_faiss_top_k_equals_cpu_faiss(factory, params, tmp_path):
    """With faiss-gpu installed (`make setup-gpu`): the GPU index returns the CPU index's top-k (Flat exactly; IVF
    with the same probes), and the timing of both is printed for docs/benchmarks.md."""
    import time

    import numpy as np

    from embedder.retrieval.faiss_index import FaissIndex, import_faiss

    faiss = import_faiss()
    if not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        msg = "this faiss has no GPU support (pip install faiss-gpu-cu12, or make setup-gpu)"
        if os.environ.get("EMBEDDER_REQUIRE_GPU_FAISS"):  # bench/gpu_session.sh installs faiss-gpu: a skip is a failure
            pytest.fail(msg)
        pytest.skip(msg)
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((50_000, 128), dtype=np.float32)
    queries = rng.standard_normal((2_000, 128), dtype=np.float32)
    FaissIndex(factory, "ip", use_gpu=False, search_params=params).build(docs).save(str(tmp_path / "i.faiss"))
    out, times = {}, {}
    for use_gpu in (False, True):  # the same trained index (IVF centroids), searched on each side
        index = FaissIndex.load(str(tmp_path / "i.faiss"), use_gpu=use_gpu)
        index.search(queries[:10], 10)  # warm-up
        t0 = time.perf_counter()
        out[use_gpu] = index.search(queries, 100)
        times[use_gpu] = time.perf_counter() - t0
    (cs, ci), (gs, gi) = out[False], out[True]
    overlap = np.mean([len(set(a) & set(b)) / 100 for a, b in zip(ci, gi)])
    print(f"\n{factory} {params}: CPU {len(queries) / times[False]:.0f} q/s, GPU {len(queries) / times[True]:.0f} q/s, "
          f"top-100 overlap {overlap:.4f}")
    assert overlap >= (0.999 if factory == "Flat" else 0.99)  # float summation order may swap near-ties
    np.testing.assert_allclose(np.sort(cs, 1), np.sort(gs, 1), rtol=1e-3, atol=1e-3)
