"""The kept-patch figure's masks (paper Fig. 3)."""
from types import SimpleNamespace

import torch

from evit.visualize import kept_patch_masks


class KeptIndices(torch.nn.Module):
    """Stands in for an EViT forward pass: returns fixed kept indices (original positions, -1 = fused token)."""

    def __init__(self, kept):
        super().__init__()
        self.kept = kept
        self.patch_embed = SimpleNamespace(grid_size=(2, 2))

    def forward(self, images, keep_rate=None, return_kept=False):
        return images, self.kept


def test_a_fused_token_never_hides_a_kept_patch_0():
    kept = [torch.tensor([[0, 3, -1], [-1, 0, 2]]), torch.tensor([[-1, 0], [0, -1]])]
    masks = kept_patch_masks(KeptIndices(kept), torch.zeros(2, 3, 4, 4))
    assert masks[0].tolist() == [[[True, False], [False, True]], [[True, False], [True, False]]]
    assert masks[1].sum(dim=(1, 2)).tolist() == [1, 1]  # patch 0 is kept in both rows, the fused token is no patch
