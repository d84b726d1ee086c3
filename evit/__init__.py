"""EViT: token reorganization for vision transformers (Liang et al., ICLR 2022).

Importing `evit` registers the EViT models with timm.
"""
from . import models  # noqa: F401  (registers the timm models)
