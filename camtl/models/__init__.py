"""CA-MTL models on HF transformers (imported lazily: ``import camtl`` does not need transformers)."""

from camtl.models.camtl_model import CaMtl, CaMtlOutput
from camtl.models.encoders import CaMtlBaseEncoder, CaMtlLargeEncoder, CheckpointKeysError

__all__ = ["CaMtl", "CaMtlOutput", "CaMtlBaseEncoder", "CaMtlLargeEncoder", "CheckpointKeysError"]
