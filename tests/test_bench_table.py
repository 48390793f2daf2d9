"""The protocol's table (bench/beir_recipe.py): the paired gain over a chosen side and the keep rule that decides
recipe defaults (keep a change only when its mean gain over the datasets is larger than twice its spread over
splits). Synthetic rows, so each verdict is known by hand."""

from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("beir_recipe", os.path.join(ROOT, "bench", "beir_recipe.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(ndcg: float) -> dict:
    return {"overrides": [], "wall_s": 100.0, "cpu_s": 100.0, "peak_rss_gib": 1.0, "ndcg@10": ndcg}


def _results(steady: dict[str, tuple[float, float]], noisy: dict[str, tuple[float, float]]) -> dict:
    """Two datasets x two splits; `dense4` at 0.50 / 0.60, `steady` and `noisy` at the given gains per split."""
    out = {}
    for ds in ("a", "b"):
        out[ds] = {}
        for i, split in enumerate(("1", "2")):
            out[ds][split] = {"dense4": _row(0.5 + 0.1 * i), "steady": _row(0.5 + 0.1 * i + steady[ds][i]),
                              "noisy": _row(0.5 + 0.1 * i + noisy[ds][i])}
    return out


def test_keep_rule_pairs_against_the_chosen_side():
    bench = _bench()
    results = _results(steady={"a": (0.02, 0.03), "b": (0.01, 0.02)},  # mean gain 0.02, spread 0.0071
                       noisy={"a": (0.05, -0.03), "b": (0.04, -0.02)})  # mean gain 0.01, spread 0.0495
    text = bench.table(results, against="dense4")
    rules = {line.split(",")[1].split(" vs ")[0].strip(): line for line in text.splitlines() if line.startswith("rule")}
    assert "mean gain +0.0200" in rules["steady"] and rules["steady"].endswith(": keep")
    assert "mean gain +0.0100" in rules["noisy"] and rules["noisy"].endswith(": do not keep")
    assert "| a | steady | 2 / 2 | 0.5750 ± 0.0778 | +0.0250 ± 0.0071 | 1.00x | 1.00x | 1.0 |" in text


def test_keep_rule_waits_for_two_splits_on_every_dataset():
    bench = _bench()
    results = _results(steady={"a": (0.02, 0.03), "b": (0.01, 0.02)}, noisy={"a": (0.05, -0.03), "b": (0.04, -0.02)})
    del results["b"]["2"]["steady"]
    text = bench.table(results, against="dense4")
    line = next(x for x in text.splitlines() if x.startswith("rule, steady"))
    assert line.endswith("not judged: two splits on 1 of 2 datasets")


def test_merged_export_is_the_interpolation_with_the_base_model(tmp_path):
    """A MERGED row's model: a fine-tuned export of the bundled MiniLM (here: its weights moved by hand), merged by
    embedder's own merge_with_base and written by export_encoder, is (1 - w) x trained + w x base, tensor by tensor,
    and loads as a sentence-transformers model."""
    import torch
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    from embedder.bundled import minilm_path
    from embedder.export import export_encoder
    from embedder.modeling.encoder import DualEncoder

    bench = _bench()
    encoder = DualEncoder(model_name_or_path=minilm_path(), pooling="mean", normalize=True)
    with torch.no_grad():
        for i, p in enumerate(encoder.parameters()):  # "training": every trainable tensor moved, differently
            if p.requires_grad:  # (BERT's pooler head is frozen: mean pooling never uses it)
                p.add_(0.01 * (i % 7 + 1))
    trained, merged = str(tmp_path / "trained"), str(tmp_path / "merged")
    export_encoder(type("Module", (), {"encoder": encoder})(), trained, {"query": "", "document": ""}, 256)
    bench.merged_export(trained, merged, 0.25)
    base = load_file(os.path.join(minilm_path(), "model.safetensors"))
    t, m = load_file(os.path.join(trained, "model.safetensors")), load_file(os.path.join(merged, "model.safetensors"))
    assert set(m) == set(t)
    floats = [k for k in m if m[k].is_floating_point()]
    off = [k for k in floats if not torch.allclose(m[k], 0.75 * t[k] + 0.25 * base[k], atol=1e-6)]
    assert floats and not off, off  # a frozen tensor equals the base's, so it is its own merge
    assert not torch.allclose(m[floats[0]], t[floats[0]])  # the merge changed the weights
    emb = SentenceTransformer(merged, device="cpu").encode(["a claim about prions"])
    assert emb.shape == (1, 384)
