"""EViT: token reorganization for vision transformers (Liang et al., ICLR 2022).

`import evit` is light (no torch): the launcher and the workflow import only `evit.config` and `evit.launch`.
`import evit.models` registers the EViT models with timm.
"""
