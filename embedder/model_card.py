"""The export's model card (`README.md`): what a Hub page or a colleague needs to use and judge the model.

Hand-written rather than sentence-transformers' generated card, because that card knows nothing of the recipe: the
per-task instructions, the training files, the before/after evaluation.
"""

from __future__ import annotations

from typing import Any


def _table(rows: list[tuple[str, ...]], head: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def model_card(config: dict[str, Any], prompts: dict[str, str], before: dict[str, float],
               after: dict[str, float]) -> str:
    """Markdown for `<export>/README.md`. `config`: `embedder.provenance.describe_run`'s resolved config."""
    model = config.get("model") or {}
    run = config.get("run") or {}
    data = config.get("data") or {}
    optimizer = config.get("optimizer") or {}
    loss = config.get("loss") or {}
    trainer = config.get("trainer") or {}
    base = model.get("model_name_or_path", "?")
    label = config.get("recipe_name") or config.get("command_name") or "embedder"
    parts = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
             "tags: [sentence-transformers, feature-extraction, embedder, llm-embedder]", f"base_model: {base}", "---",
             "", f"# {label}: a task-aware dense retriever fine-tuned with embedder", "",
             f"Fine-tuned from `{base}` with the LLM-Embedder recipe (contrastive loss with hard negatives"
             f"{', distillation from LM teacher scores' if _distils(config) else ''}"
             f"). Pooling: {model.get('pooling', '?')}; normalised: {model.get('normalize', '?')}.", ""]
    parts += ["## Usage", "", "```python", "from sentence_transformers import SentenceTransformer", "",
              'model = SentenceTransformer("path/or/hub-id")']
    if "query" in prompts:
        parts += ['q = model.encode_query(["how do tides work?"])          # prompt "query"',
                  'd = model.encode_document(["Tides are caused by ..."])   # prompt "document"']
    for name in sorted(p[: -len("_query")] for p in prompts if p.endswith("_query"))[:3]:
        parts += [f'model.encode(["..."], prompt_name="{name}_query")  # {name} queries; keys: "{name}_key"']
    parts += ["print(model.similarity(q, d))" if "query" in prompts else "", "```", ""]
    parts += ["## Instructions (sentence-transformers prompts)", "",
              _table([(k, repr(v)) for k, v in sorted(prompts.items())], ("prompt name", "text")), ""]
    files = run.get("train_records") or {}
    if files:
        parts += ["## Training data", "", _table([(p, n) for p, n in files.items()], ("file", "records")), ""]
    hp = [("batch size per device", data.get("batch_size")), ("group size (1 positive + negatives)",
          data.get("group_size")), ("learning rate", optimizer.get("lr")), ("warmup ratio", config.get("warmup_ratio")),
          ("temperature", loss.get("temperature")), ("max steps", trainer.get("max_steps")),
          ("Matryoshka dimensions (SentenceTransformer(..., truncate_dim=d))", loss.get("matryoshka_dims")),
          ("precision", trainer.get("precision")), ("query / key max length",
          f"{config.get('query_max_length')} / {config.get('key_max_length')}")]
    parts += ["## Hyperparameters", "", _table([(k, v) for k, v in hp if v is not None], ("setting", "value")), ""]
    if after:
        rows = [(k.removeprefix("val/"), f"{before[k]:.4f}" if k in before else "-", f"{v:.4f}")
                for k, v in sorted(after.items())]
        parts += ["## Evaluation (before -> after fine-tuning)", "", _table(rows, ("metric", "before", "after")), ""]
    versions = run.get("versions") or {}
    parts += ["## Reproduce", "", f"Code: embedder, commit `{run.get('git_commit') or 'unknown'}`; "
              + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".", "The full config is in the training "
              "run's `config.yaml`.", ""]
    return "\n".join(parts)


def _distils(config: dict[str, Any]) -> bool:
    """Whether a record kind of the run lists a distillation loss (a class whose name says so) with weight > 0."""
    kinds = [t for t in (config.get("record_kinds") or {}).values() if isinstance(t, dict)]
    listed = [e for t in kinds for e in (t.get("losses") or []) if isinstance(e, dict)]
    legacy = [t.get("loss") or {} for t in kinds]
    return any("Distill" in str(e.get("_target_")) and e.get("weight", 1.0) for e in listed) or \
        any(b.get("distill_weight") for b in legacy)
