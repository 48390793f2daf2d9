"""embedder: task-aware dense retrievers for retrieval-augmented LLMs (the LLM-Embedder recipe)."""

__version__ = "0.1.0"
