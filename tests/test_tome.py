"""The ToMe model's mathematics, against timm's DeiT and an explicit reference; its token counts, checkpoints, MACs."""
import pytest
import timm
import torch
import torch.nn.functional as F

import evit.models  # noqa: F401  (registers the EViT and ToMe models with timm)
from evit.benchmark import token_counts
from evit.checkpoint import load_pretrained
from evit.models import ToMe

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)  # 16 patches + CLS = 17 tokens


def make(name="tome_deit_tiny_patch16_224", **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


def images(n=2, size=224, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def explicit_tome_logits(model: ToMe, x: torch.Tensor, r: list[int]) -> torch.Tensor:
    """ToMe written out plainly: full attention matrices with + log(size), and per-sample loops for the matching."""
    x = model._pos_embed(model.patch_embed(x))
    size = torch.ones(x.shape[:2])
    for blk, r_block in zip(model.blocks, r):
        mod = blk.attn
        B, N, C = x.shape
        q, k, v = mod.qkv(blk.norm1(x)).reshape(B, N, 3, mod.num_heads, mod.head_dim).permute(2, 0, 3, 1, 4)
        attn = ((q * mod.scale) @ k.transpose(-2, -1) + size.log()[:, None, None, :]).softmax(dim=-1)
        x = x + mod.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        r_block = min(r_block, (N - 1) // 2)
        if r_block > 0:
            keys = k.mean(dim=1)
            xs, sizes = [], []
            for b in range(B):
                set_a, set_b = list(range(0, N, 2)), list(range(1, N, 2))
                best = {}  # A token (never CLS) -> (similarity, its most similar B token)
                for i in set_a[1:]:
                    sims = [F.cosine_similarity(keys[b, i], keys[b, j], dim=0).item() for j in set_b]
                    m = max(range(len(set_b)), key=sims.__getitem__)
                    best[i] = (sims[m], set_b[m])
                merged = sorted(best, key=lambda i: -best[i][0])[:r_block]
                groups = {j: [j] + [i for i in merged if best[i][1] == j] for j in set_b}
                order = [[i] for i in set_a if i not in merged] + [groups[j] for j in set_b]
                xs.append(torch.stack([sum(x[b, i] * size[b, i] for i in g) / sum(size[b, i] for i in g)
                                       for g in order]))
                sizes.append(torch.stack([sum(size[b, i] for i in g) for g in order]))
            x, size = torch.stack(xs), torch.stack(sizes)
        x = x + blk.mlp(blk.norm2(x))
    return model.head(model.norm(x)[:, 0])


def test_r0_is_timm_deit_logit_for_logit():
    deit = make("deit_tiny_patch16_224")
    tome = make(r=0)
    tome.load_state_dict(deit.state_dict())
    with torch.inference_mode():
        assert torch.allclose(tome(images()), deit(images()), atol=1e-5)


@pytest.mark.parametrize("r", [3, [2, 0, 5, 1], 100])
def test_matches_the_explicit_reference(r):
    model = make(**TINY, r=r)
    with torch.no_grad():  # larger weights than timm's init, so keys and merges differ more clearly
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    x = images(size=32)
    with torch.inference_mode():
        got, plain = model(x), model(x, r=0)
        ref = explicit_tome_logits(model, x, model.r)
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    assert not torch.allclose(got, plain, atol=1e-3)  # merging changed the logits


def test_r_overrides_for_one_pass():
    a, b = make(**TINY, r=0), make(**TINY, r=[3, 3, 0, 2])
    x = images(size=32)
    with torch.inference_mode():
        torch.testing.assert_close(a(x, r=[3, 3, 0, 2]), b(x))
        torch.testing.assert_close(b(x, r=0), a(x))
        torch.testing.assert_close(b(x), a(x, r=[3, 3, 0, 2]))  # the override lasted one pass
    with pytest.raises(ValueError, match="4 of them"):
        a(x, r=[1, 2])


def _seen_counts(model, x, r=None):
    """Tokens each block's attention and MLP actually receive in a pass."""
    seen = []
    for blk in model.blocks:
        blk.register_forward_pre_hook(lambda mod, inp: seen.append(["attn", inp[0].shape[1]]))
        blk.mlp.register_forward_pre_hook(lambda mod, inp: seen[-1].extend(["mlp", inp[0].shape[1]]))
    with torch.inference_mode():
        model(x, r=r)
    return [(a, m) for _, a, _, m in seen]


@pytest.mark.parametrize("r, expected_mlp", [
    (8, [197 - 8 * k for k in range(1, 13)]),
    ([0, 16, 16, 0, 8, 8, 8, 8, 0, 0, 4, 4], [197, 181, 165, 165, 157, 149, 141, 133, 133, 133, 129, 125]),
    (100, [99, 50, 26, 14, 8, 5, 3, 2, 2, 2, 2, 2]),  # capped at (N - 1) // 2: CLS and half the rest remain
])
def test_token_counts_deit_small_at_224(r, expected_mlp):
    model = make("tome_deit_small_patch16_224", r=r)
    counts = model.token_counts()
    assert [t.mlp for t in counts] == expected_mlp
    assert [t.attn for t in counts] == [197] + expected_mlp[:-1]
    assert _seen_counts(model, images(n=1)) == [(t.attn, t.mlp) for t in counts]
    assert token_counts(model) == counts


def test_token_counts_follow_an_override():
    model = make("tome_deit_small_patch16_224", r=0)
    counts = model.token_counts(r=4)
    assert [t.mlp for t in counts] == [197 - 4 * k for k in range(1, 13)]
    assert _seen_counts(model, images(n=1), r=4) == [(t.attn, t.mlp) for t in counts]


def test_deit_checkpoint_loads_and_r0_gives_deit_logits(tmp_path):
    deit = make("deit_tiny_patch16_224")
    path = tmp_path / "deit.pth"
    torch.save({"model": deit.state_dict(), "epoch": 299}, path)
    model = timm.create_model("tome_deit_tiny_patch16_224", r=0)
    load_pretrained(model, path)
    with torch.inference_mode():
        torch.testing.assert_close(model.eval()(images()), deit(images()), rtol=0, atol=1e-5)
        assert model(images(), r=8).shape == (2, 1000)


def test_trains_and_refuses_gradient_checkpointing():
    model = make(**TINY, r=3).train()
    model(images(size=32)).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model.set_grad_checkpointing()
