"""Build the encoder for evaluation or mining from the `model` config, or from any saved model folder or hub name.

`model_path` accepts:

- a training output of `train.py` (it holds `embedder_config.json`: pooling, normalize, dense layer, tied or
  untied encoders, which are read from there; its tokenizer ends texts as in training: no EOS is appended again);
- a sentence-transformers folder (pooling from `1_Pooling/config.json`, normalisation from `modules.json`);
- a plain Hugging Face folder or hub name (the `model` config's pooling and normalize apply).

The `model` config's `gguf_file` (model=smollm2) applies only to a folder that holds that file: the export of a model
trained from a GGUF checkpoint is a safetensors folder.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger(__name__)


def encoder_overrides(model_path: str) -> dict[str, Any]:
    """DualEncoder arguments that `model_path` itself determines (see the module docstring)."""
    out: dict[str, Any] = {"model_name_or_path": model_path, "key_model_name_or_path": None,
                           "tokenizer_name_or_path": None}
    if not os.path.isdir(model_path):
        return out  # a hub name: the model config's pooling/normalize apply
    ours = os.path.join(model_path, "embedder_config.json")
    if os.path.isfile(ours):
        with open(ours, encoding="utf-8") as f:
            meta = json.load(f)
        # append_eos=False: the export's tokenizer already ends texts as in training (an appended EOS is in its
        # tokenizer.json); the model config's `auto` would append one to a model trained without it
        out.update(pooling=meta.get("pooling", "cls"), normalize=bool(meta.get("normalize", True)),
                   dense=bool(meta.get("dense", False)), tie_encoders=bool(meta.get("tie_encoders", True)),
                   append_eos=False)
        if not out["tie_encoders"]:  # the Router export's encoders (older exports: query_encoder/, key_encoder/)
            q = os.path.join(model_path, meta.get("query_encoder", "query_encoder"))
            out.update(model_name_or_path=q, key_model_name_or_path=os.path.join(model_path, meta.get(
                "key_encoder", "key_encoder")), tokenizer_name_or_path=q)
        return out
    modules = os.path.join(model_path, "modules.json")
    if os.path.isfile(modules):
        with open(modules, encoding="utf-8") as f:
            mods = json.load(f)
        out["normalize"] = any(str(m.get("type", "")).endswith("Normalize") for m in mods)
        for m in mods:
            if str(m.get("type", "")).endswith("Pooling"):
                pcfg = os.path.join(model_path, m.get("path", ""), "config.json")
                if os.path.isfile(pcfg):
                    with open(pcfg, encoding="utf-8") as f:
                        p = json.load(f)
                    mode = p.get("pooling_mode")  # sentence-transformers >= 5: "cls" | "mean" | ...
                    if mode in ("cls", "mean"):
                        out["pooling"] = mode
                    elif mode == "lasttoken" or p.get("pooling_mode_lasttoken"):
                        out["pooling"] = "last_token"
                    elif p.get("pooling_mode_cls_token"):
                        out["pooling"] = "cls"
                    elif p.get("pooling_mode_mean_tokens"):
                        out["pooling"] = "mean"
                    else:
                        log.warning("%s: sentence-transformers pooling %s is not cls, mean or lasttoken; using the model "
                                    "config's pooling", pcfg, {k: v for k, v in p.items() if v is True})
    return out


def load_encoder(model_cfg: Any, model_path: str | None = None) -> Any:
    """Instantiate the `model` config (a DualEncoder), with `model_path`'s settings when given."""
    import hydra
    from omegaconf import DictConfig, OmegaConf

    cfg = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    if model_path:
        cfg.update(encoder_overrides(str(model_path)))
        gguf = cfg.get("gguf_file")
        if gguf and os.path.isdir(model_path) and not os.path.isfile(os.path.join(model_path, gguf)):
            cfg["gguf_file"] = None  # model=smollm2's .gguf: an export of a model trained from it is safetensors
        log.info("encoder %s (pooling=%s, normalize=%s)", cfg["model_name_or_path"], cfg.get("pooling"),
                 cfg.get("normalize"))
    return hydra.utils.instantiate(cfg)
