"""One training step of embedder equals sentence-transformers' on the same batch: the real all-MiniLM-L6-v2, the
real tokenizer and collator, InfoNCE at tau 0.05 against MultipleNegativesRankingLoss at scale 20, padded and packed
(the CPU path `model.unpadded=auto` takes on long batches). The plain side of the BEIR protocol
(`bench/beir_recipe.py`) is that loss; this pins the part of the comparison that must not differ: the loss and every
weight's gradient, so a gap between the two sides comes from what they choose to differ in (negatives, sampling,
settings), never from the step itself."""

from __future__ import annotations

import pytest

from embedder.bundled import minilm_path

# claims, and documents on the same topics (hard negatives) of very different lengths: a padded batch is mostly padding
QUERIES = ["Vitamin D deficiency raises the risk of multiple sclerosis.",
           "Aspirin lowers colorectal cancer incidence.",
           "Statins cause memory loss in older adults.",
           "Sleep deprivation impairs glucose tolerance."]
POSITIVES = ["Vitamin D status and MS risk " + "in a prospective cohort of nurses, higher intake was associated with "
             "lower incidence of multiple sclerosis over twenty years of follow-up. " * 6,
             "Aspirin and colorectal cancer: long-term follow-up of randomised trials.",
             "Statin use and cognition: no consistent evidence of memory decline was found " * 3,
             "Short sleep and metabolism: restricting sleep for six nights changed glucose handling."]
NEGATIVES = [["Vitamin D supplementation " * 10 + "and fractures in the elderly.",  # same topics, other claims
              "Multiple sclerosis relapse rates under interferon beta treatment."],
             ["Aspirin use and gastrointestinal bleeding in older adults " * 5,
              "Colorectal cancer screening by colonoscopy reduces mortality."],
             ["Statins lower LDL cholesterol and cardiovascular events in older adults.",
              "Memory loss in older adults " * 12 + "is associated with hearing impairment."],
             ["Sleep deprivation impairs attention and working memory.",
              "Glucose tolerance " * 15 + "declines with age in healthy adults."]]
GROUP = 3  # 1 positive + 2 hard negatives per query


def _groups() -> list[list[str]]:
    return [[pos, *negs] for pos, negs in zip(POSITIVES, NEGATIVES)]


@pytest.fixture(scope="module")
def st_step():
    """sentence-transformers' step, once for both of our paths."""
    return _st_step()


def _st_step():
    from sentence_transformers import SentenceTransformer
    try:  # sentence-transformers >= 6 (the old path still works there, with a deprecation warning)
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:
        from sentence_transformers.losses import MultipleNegativesRankingLoss

    model = SentenceTransformer(minilm_path(), device="cpu")
    model.max_seq_length = 256
    model.eval()  # no dropout: both sides' steps are deterministic
    columns = [QUERIES] + [[g[j] for g in _groups()] for j in range(GROUP)]  # anchor, positive, negative_1, ...
    features = [getattr(model, "preprocess", model.tokenize)(col) for col in columns]  # tokenize before 6.x
    loss = MultipleNegativesRankingLoss(model, scale=20.0)(features, None)
    loss.backward()
    grads = {n: p.grad for n, p in model[0].auto_model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def _embedder_step(unpadded: str):
    from embedder.data.collator import RetrievalCollator
    from embedder.lit_module import RetrieverModule
    from embedder.modeling.encoder import DualEncoder
    from embedder.record_kinds import build_record_kinds

    enc = DualEncoder(minilm_path(), pooling="mean", normalize=True, unpadded=unpadded)
    module = RetrieverModule(enc, build_record_kinds(
        {"beir": {"losses": [{"_target_": "embedder.losses.InfoNCELoss", "weight": 1.0}]}}, GROUP),
        temperature=0.05, cross_device=False)
    module.eval()
    items = [{"query": q, "keys": g, "teacher_scores": None, "record_kind": "beir", "dataset": "claims"}
             for q, g in zip(QUERIES, _groups())]
    batch = RetrievalCollator(enc.tokenizer, 256, 256)(items)
    mask = batch["key"]["attention_mask"]
    padded_share = 1 - float(mask.sum()) / mask.numel()
    q, k = enc.encode(batch["query"], "query"), enc.encode(batch["key"], "key")
    loss = module.compute_loss(q, k, None, "beir", batch["key_ids"])["loss"]
    loss.backward()
    grads = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, padded_share


@pytest.mark.parametrize("unpadded", ["false", "true"])
def test_one_step_equals_sentence_transformers_mnrl(unpadded, st_step):
    st_loss, st_grads = st_step
    loss, grads, padded_share = _embedder_step(unpadded)
    assert padded_share > 0.5  # the keys are mostly padding: packing changes what the kernels see
    assert 0.05 < st_loss < 3.0  # a real, non-uniform loss (uniform over 12 candidates would be ln 12 = 2.48)
    assert abs(loss - st_loss) < 1e-5, (loss, st_loss)
    largest = max(float(g.abs().max()) for g in st_grads.values())
    matched = 0
    for name, g in st_grads.items():
        ours = [v for n, v in grads.items() if n.endswith("." + name)]
        assert len(ours) == 1, (name, [n for n in grads if n.endswith(name)])
        # relative to the weight's own gradient; the attention key biases get a floor (softmax ignores a key bias:
        # their true gradient is 0 and both sides give float noise of 1e-8)
        tol = 1e-4 * float(g.abs().max()) + 1e-6 * largest
        assert float((ours[0] - g).abs().max()) <= tol, (name, float((ours[0] - g).abs().max()), tol)
        matched += 1
    assert matched == len(grads) and matched > 90  # every weight of the 6-layer MiniLM, none extra on our side
