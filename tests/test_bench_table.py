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
