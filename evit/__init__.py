"""EViT: token reorganization for vision transformers (Liang et al., ICLR 2022)."""
