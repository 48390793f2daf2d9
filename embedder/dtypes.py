"""The one dtype resolver: every entry point accepts the same spellings (`bf16`/`bfloat16`, `fp16`/`float16`/`half`,
`fp32`/`float32`/`float`), plus `auto` (bf16 on a CUDA device that supports it, else fp32) and `model`/null (keep
the weights' dtype)."""

from __future__ import annotations

from typing import Any

SPELLINGS = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "fp32": "float32", "float32": "float32", "float": "float32",
}


def resolve_dtype(name: Any, device: Any = None) -> Any:
    """A torch dtype for `name` (see the module docstring), or None for `model`/null. `device` decides `auto`."""
    import torch

    if name is None or (isinstance(name, str) and name.lower() in ("model", "none", "null")):
        return None
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key == "auto":
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if key not in SPELLINGS:
        raise ValueError(f"dtype {name!r}; valid: auto, model, {', '.join(SPELLINGS)}")
    return getattr(torch, SPELLINGS[key])
