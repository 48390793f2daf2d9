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
