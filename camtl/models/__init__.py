"""CA-MTL models on HF transformers (imported lazily: ``import camtl`` does not need transformers)."""

from camtl.models.encoders import CaMtlBaseEncoder, CaMtlLargeEncoder

__all__ = ["CaMtlBaseEncoder", "CaMtlLargeEncoder"]
