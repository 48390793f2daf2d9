"""The package layering issue 8 asks for: mining/ and evaluation/ share retrieval/ and never import each other."""

from __future__ import annotations

import ast
import pathlib

import embedder

PKG = pathlib.Path(embedder.__file__).parent


def imported_modules(package: str) -> dict[str, set[str]]:
    """`{file: {module imported}}` for every .py file under embedder/<package>, top-level and function-level."""
    out = {}
    for path in (PKG / package).rglob("*.py"):
        mods = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                mods.add(node.module)
            elif isinstance(node, ast.Import):
                mods.update(a.name for a in node.names)
        out[str(path.relative_to(PKG / package))] = mods
    return out


def test_mining_and_evaluation_do_not_import_each_other():
    for package, other in (("mining", "embedder.evaluation"), ("evaluation", "embedder.mining")):
        found = imported_modules(package)
        assert found, f"no files under embedder/{package}"
        bad = {f: sorted(m for m in mods if m == other or m.startswith(other + ".")) for f, mods in found.items()}
        assert not {f: m for f, m in bad.items() if m}, f"embedder/{package} imports {other}: {bad}"


def test_retrieval_imports_neither_mining_nor_evaluation():
    found = imported_modules("retrieval")
    assert "encode/predict.py" in found and "faiss_index.py" in found and "build.py" in found
    for f, mods in found.items():
        assert not [m for m in mods if m.startswith(("embedder.mining", "embedder.evaluation", "embedder.evaluate"))], f


def test_both_use_retrieval():
    for package in ("mining", "evaluation"):
        mods = set().union(*imported_modules(package).values())
        assert any(m.startswith("embedder.retrieval") for m in mods), package


FORBIDDEN = {  # what each package's __init__ docstring says it must not import
    "data": ("embedder.modeling", "embedder.retrieval", "embedder.evaluation", "embedder.mining", "embedder.scoring",
             "embedder.training", "embedder.lit_module"),
    "modeling": ("embedder.training", "embedder.lit_module", "embedder.retrieval", "embedder.evaluation",
                 "embedder.mining", "embedder.scoring"),
    "scoring": ("embedder.training", "embedder.lit_module", "embedder.retrieval", "embedder.evaluation",
                "embedder.mining"),
    "losses": ("embedder.data", "embedder.modeling", "embedder.retrieval", "embedder.training"),
}


def test_each_package_keeps_to_its_layer():
    for package, forbidden in FORBIDDEN.items():
        for f, mods in imported_modules(package).items():
            bad = sorted(m for m in mods if m.startswith(forbidden))
            assert not bad, f"embedder/{package}/{f} imports {bad}"


# Every module of the package, by layer: a module imports only from its own layer or lower ones (function-level
# imports included), so no import climbs back up. docs/architecture.md draws the same table.
LAYERS = [
    ("foundation", {"embedder", "stopping", "errors", "atomic", "fingerprint", "progress", "paths", "dtypes",
                    "distributed", "host_memory", "bundled", "provenance", "model_card", "report", "callbacks",
                    "config_check", "sample_data"}),
    ("data and losses", {"data", "losses"}),
    ("record kinds and modeling", {"record_kinds", "modeling"}),
    ("retrieval and scoring", {"retrieval", "scoring"}),
    ("mining, evaluation and the config package", {"mining", "evaluation", "config"}),
    ("recipes and the training pieces", {"recipes", "lit_module", "checkpoints", "export", "gradcache", "remine"}),
    ("the training loop", {"training"}),
    ("entry points", {"cli", "evaluate"}),
]
SAME_LAYER_FORBIDDEN = {  # within a layer, these pairs stay apart as well
    ("mining", "evaluation"), ("evaluation", "mining"), ("retrieval", "scoring"), ("scoring", "retrieval"),
    ("losses", "data"), ("data", "losses"),
}


def _unit(module: str) -> str:
    """`embedder.data.corpus` -> `data`; `embedder.training` -> `training`; `embedder` -> `embedder`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_module_keeps_to_its_layer():
    layer_of = {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}
    files = [p for p in PKG.rglob("*.py") if "configs" not in p.relative_to(PKG).parts]
    units = {_unit(".".join(("embedder", *p.relative_to(PKG).with_suffix("").parts))).removesuffix(".__init__")
             for p in files}
    units = {u if u != "__init__" else "embedder" for u in units}
    assert units - set(layer_of) == set(), f"modules with no layer: add them to LAYERS: {sorted(units - set(layer_of))}"
    climbs = []
    for path in files:
        rel = path.relative_to(PKG).with_suffix("").parts
        unit = rel[0] if rel[0] != "__init__" else "embedder"
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                if not name.startswith("embedder"):
                    continue
                target = _unit(name)
                if name == "embedder" and isinstance(node, ast.ImportFrom):  # `from embedder import x`: x's unit
                    target = node.names[0].name
                if target == unit or target not in layer_of:
                    continue
                if layer_of[target] > layer_of[unit] or (unit, target) in SAME_LAYER_FORBIDDEN:
                    climbs.append(f"{'/'.join(rel)}.py imports {name}")
    assert not climbs, "imports that climb a layer:\n" + "\n".join(sorted(climbs))
