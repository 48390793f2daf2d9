from embedder.modeling.encoder import DualEncoder

__all__ = ["DualEncoder"]
