"""Models: `DualEncoder` (query/key encoders, pooling, export as a sentence-transformers model) and the unpadded
(packed) forward shared with LM scoring. No loss code and no data reading here; must not import training,
retrieval, evaluation, mining or scoring."""

from embedder.modeling.encoder import DualEncoder, from_pretrained_with_attention

__all__ = ["DualEncoder", "from_pretrained_with_attention"]
