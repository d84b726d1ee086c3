"""The EViT model's mathematics, against timm and an explicit-attention reference (synthetic tensors)."""
import math

import pytest
import timm
import torch

import evit.models  # noqa: F401  (registers the EViT models with timm)
from evit.models import EViT


def make(name="evit_deit_small_patch16_224", **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


def images(n=2, size=224, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def explicit_evit_logits(model: EViT, x: torch.Tensor, keep_rate: float, fuse: bool) -> torch.Tensor:
    """EViT written out plainly: full attention matrices, argsort, and a per-sample complement set."""
    x = model._pos_embed(model.patch_embed(x))
    for i, blk in enumerate(model.blocks):
        attn_mod = blk.attn
        h = blk.norm1(x)
        B, N, C = h.shape
        q, k, v = attn_mod.qkv(h).reshape(B, N, 3, attn_mod.num_heads, attn_mod.head_dim).permute(2, 0, 3, 1, 4)
        attn = ((q * attn_mod.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = x + attn_mod.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        n_keep = math.ceil(keep_rate * (N - 1))
        if i in model.drop_loc and n_keep < N - 1:
            score = attn[:, :, 0, 1:].mean(dim=1)
            order = score.argsort(dim=1, descending=True)
            rows = []
            for b in range(B):
                others = x[b, 1:]
                keep, rest = order[b, :n_keep], order[b, n_keep:]
                row = [x[b, :1], others[keep]]
                if fuse:
                    row.append((others[rest] * score[b, rest, None]).sum(dim=0, keepdim=True))
                rows.append(torch.cat(row))
            x = torch.stack(rows)
        x = x + blk.mlp(blk.norm2(x))
    return model.head(model.norm(x)[:, 0])


@pytest.mark.parametrize("keep_rate, fuse, expected", [
    (0.7, True, [139, 99, 71]),
    (0.7, False, [138, 97, 68]),
    (0.5, True, [99, 51, 27]),
    (0.5, False, [98, 49, 25]),
])
def test_token_counts_per_stage_at_224(keep_rate, fuse, expected):
    model = make(keep_rate=keep_rate, fuse_token=fuse)
    counts = []
    for blk in model.blocks:  # record the sequence length entering each MLP
        blk.mlp.register_forward_hook(lambda mod, inp, out: counts.append(inp[0].shape[1] - 1))
    with torch.inference_mode():
        _, kept = model(images(), return_kept=True)
    assert counts[2] == 196
    assert [counts[i] for i in (3, 6, 9)] == expected
    assert counts[3:6] == [expected[0]] * 3 and counts[9:] == [expected[2]] * 3
    # the kept indices: one entry per non-fused kept token
    assert [k.shape[1] + int(fuse) for k in kept] == expected


def test_keep_rate_one_equals_timm_deit_small():
    deit = make("deit_small_patch16_224")
    model = make(keep_rate=1.0, fuse_token=True)
    model.load_state_dict(deit.state_dict())
    x = images()
    with torch.inference_mode():
        delta = (model(x) - deit(x)).abs().max().item()
    assert delta <= 1e-5


@pytest.mark.parametrize("keep_rate, fuse", [(0.7, True), (0.5, False), (0.6, True)])
def test_pruned_logits_equal_explicit_attention_reference(keep_rate, fuse):
    model = make("evit_deit_tiny_patch16_224", keep_rate=keep_rate, fuse_token=fuse)
    x = images()
    with torch.inference_mode():
        ours = model(x)
        ref = explicit_evit_logits(model, x, keep_rate, fuse)
    assert (ours - ref).abs().max().item() <= 1e-4
    # and pruning does change the function: the reference at keep rate 1 differs
    with torch.inference_mode():
        assert (ours - explicit_evit_logits(model, x, 1.0, fuse)).abs().max().item() > 1e-3


def test_keep_rate_override_matches_a_model_built_with_that_rate():
    target = make(keep_rate=0.5, fuse_token=True)
    other = make(keep_rate=0.8, fuse_token=True)
    other.load_state_dict(target.state_dict())
    x = images()
    with torch.inference_mode():
        assert torch.equal(target(x, keep_rate=0.8), other(x))
        assert not torch.allclose(target(x), other(x))


def test_blocks_with_rate_one_never_prune_whatever_the_override():
    model = make("evit_deit_tiny_patch16_224", keep_rate=1.0)
    with torch.inference_mode():
        _, kept = model(images(), keep_rate=0.5, return_kept=True)
    assert kept == []
    model = make("evit_deit_tiny_patch16_224", keep_rate=0.7, drop_loc=(4,))
    with torch.inference_mode():
        _, kept = model(images(), keep_rate=0.5, return_kept=True)
    assert [k.shape[1] for k in kept] == [98]


def test_kept_indices_map_to_original_patches():
    model = make("evit_deit_tiny_patch16_224", keep_rate=0.5, fuse_token=True)
    with torch.inference_mode():
        _, kept = model(images(3), return_kept=True)
    first = kept[0]
    assert first.min() >= 0 and first.max() < 196
    for b in range(3):
        assert len(set(first[b].tolist())) == first.shape[1]
        for earlier, later in zip(kept, kept[1:]):
            real = [p for p in later[b].tolist() if p >= 0]
            assert set(real) <= set(earlier[b].tolist())  # a patch once dropped never returns


def test_fused_token_is_the_unnormalized_attention_weighted_sum():
    from evit.models import reorganize_tokens

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 4, generator=g)
    attn = torch.rand(2, 5, generator=g) * 0.1
    out, idx = reorganize_tokens(x, attn, 2, fuse_token=True)
    assert out.shape == (2, 4, 4)
    for b in range(2):
        top = attn[b].argsort(descending=True)
        assert idx[b].tolist() == top[:2].tolist()
        rest = top[2:]
        expected = (x[b, 1:][rest] * attn[b, rest, None]).sum(0)
        torch.testing.assert_close(out[b, -1], expected)
        torch.testing.assert_close(out[b, 1:3], x[b, 1:][top[:2]])


def test_bad_keep_rate_and_drop_loc_are_named():
    with pytest.raises(ValueError, match="keep_rate"):
        make("evit_deit_tiny_patch16_224", keep_rate=1.5)
    for drop_loc in [(3, 12), (3, 3, 9), (9, 3, 6)]:  # a repeated block would reorganize once, labelled twice
        with pytest.raises(ValueError, match=fr"drop_loc must be increasing block indices in 0..11, got "
                                             fr"\[{', '.join(map(str, drop_loc))}\]"):
            make("evit_deit_tiny_patch16_224", keep_rate=0.7, drop_loc=drop_loc)


def test_registered_variants_and_image_sizes():
    names = timm.list_models("evit_*")
    for size in ("tiny", "small", "base"):
        assert f"evit_deit_{size}_patch16_224" in names
    with torch.device("meta"):
        assert timm.create_model("evit_deit_small_patch16_288").patch_embed.img_size == (288, 288)
        assert timm.create_model("evit_deit_small_patch16_224", img_size=256).patch_embed.num_patches == 256
        assert timm.create_model("evit_deit_small_patch16_224").drop_loc == (3, 6, 9)


def tiny(**kwargs):
    """A 6-block EViT-Ti on 64 px images (16 patches) that reorganizes in blocks 1 and 3."""
    args = dict(img_size=64, depth=6, drop_loc=(1, 3), num_classes=5, keep_rate=0.7, fuse_token=True)
    return make("evit_deit_tiny_patch16_224", **{**args, **kwargs})


def test_blocks_map_tokens_to_tokens():
    model = make("evit_deit_tiny_patch16_224", keep_rate=0.5, fuse_token=True)
    x = images()
    with torch.inference_mode():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        out = model.blocks(tokens)  # nn.Sequential: `x = blk(x)` for every block
        assert isinstance(out, torch.Tensor) and out.shape == (2, 1 + 27, 192)  # 27: the table, fused token included
        assert torch.equal(model.norm(out), model.forward_features(x))


@pytest.mark.parametrize("keep_rate", [None, 0.5])
def test_grad_checkpointing_gives_the_same_loss_gradients_and_kept_tokens(keep_rate):
    """Checkpointed blocks run again in backward; with the pass's keep rate, or shapes would not match."""
    x = images(3, size=64)

    def step(checkpointing: bool):
        model = tiny(drop_path_rate=0.1).train()  # DropPath on: the re-run must replay the same RNG
        model.set_grad_checkpointing(checkpointing)
        calls = []
        for blk in model.blocks:
            blk.register_forward_pre_hook(lambda mod, inp: calls.append(mod))
        torch.manual_seed(3)
        logits, kept = model(x, keep_rate=keep_rate, return_kept=True)
        loss = logits.logsumexp(dim=-1).mean()
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        return loss.detach(), grads, kept, len(calls), model

    loss, grads, kept, calls, _ = step(False)
    ckpt_loss, ckpt_grads, ckpt_kept, ckpt_calls, ckpt_model = step(True)
    assert (calls, ckpt_calls) == (6, 12)  # checkpointing is on: every block ran again during backward
    assert torch.equal(loss, ckpt_loss)
    assert grads.keys() == ckpt_grads.keys()
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], rtol=0, atol=1e-7, msg=name)
    assert [k.shape[1] for k in kept] == ([8, 5] if keep_rate == 0.5 else [12, 10])
    assert len(ckpt_kept) == 2 and all(torch.equal(a, b) for a, b in zip(kept, ckpt_kept))
    # the re-run overwrote the record of its own block: still one entry per reorganizing block
    assert list(ckpt_model.pass_state.kept) == [ckpt_model.blocks[1], ckpt_model.blocks[3]]


def test_forward_intermediates_shrink_and_end_at_forward_features():
    model = make("evit_deit_tiny_patch16_224", keep_rate=0.7, fuse_token=True)
    x = images()
    with torch.inference_mode():
        final, inter = model.forward_intermediates(x)  # NLC, non-CLS tokens
        assert [t.shape[1] for t in inter] == [196] * 3 + [139] * 3 + [99] * 3 + [71] * 3
        assert torch.equal(final, model.forward_features(x))
        _, inter = model.forward_intermediates(x, indices=[2, 11], keep_rate=0.5)
        assert [t.shape[1] for t in inter] == [196, 27]
        with pytest.raises(ValueError, match="NLC"):
            model.forward_intermediates(x, output_fmt="NCHW")  # pruned tokens are no grid
        _, grids = model.forward_intermediates(x, indices=2, keep_rate=1.0, output_fmt="NCHW")
        assert [g.shape for g in grids] == [(2, 192, 14, 14)] * 2


@pytest.mark.parametrize("keep_rate", [None, 0.5, 0.9, 1.0])
def test_token_counts_are_the_shapes_the_blocks_produce(keep_rate):
    model = tiny()
    seen = []
    for blk in model.blocks:
        blk.attn.register_forward_hook(lambda mod, inp, out: seen.append([inp[0].shape[1]]))
        blk.mlp.register_forward_hook(lambda mod, inp, out: seen[-1].append(inp[0].shape[1]))
    with torch.inference_mode():
        _, kept = model(images(size=64), keep_rate=keep_rate, return_kept=True)
    counts = model.token_counts(keep_rate=keep_rate)
    assert [[t.attn, t.mlp] for t in counts] == seen
    assert [t.mlp - 1 - t.fused for t in counts if t.reorganized] == [k.shape[1] for k in kept]
    assert not any(t.reorganized for i, t in enumerate(counts) if i not in (1, 3))
    if keep_rate == 0.9:  # keeps 15 of 16 and fuses 1: a reorganization that leaves the count unchanged
        assert counts[1] == (17, 17, True, True)


def test_every_variant_is_a_registered_module_function():
    import evit.models.evit as module

    names = ["evit_deit_tiny_patch16_224", "evit_deit_small_patch16_224", "evit_deit_base_patch16_224",
             *[f"evit_deit_small_patch16_{size}" for size in (256, 272, 288, 304)]]
    assert sorted(timm.list_models("evit_*")) == sorted(names)
    for name in names:
        assert getattr(module, name).__name__ == name
        size = int(name.rsplit("_", 1)[1])
        assert timm.get_pretrained_cfg(name).input_size == (3, size, size)


def test_the_factory_builds_each_method_of_one_backbone_with_the_same_weights():
    """`build_model`: the method's timm model of the backbone, with its parameters; the plain ViT's, EViT's and
    ToMe's state dicts match key for key, so one (method none) checkpoint loads into every method's model."""
    from evit.config.schema import resolve_config
    from evit.errors import ConfigError
    from evit.models import ToMe
    from evit.models.factory import build_model

    def section(**method):
        return resolve_config({"model": {"arch": "deit_tiny_patch16_224", "img_size": 32, "patch_size": 8,
                                         **method}, "data": {"dataset": "fashion_mnist"}})["model"]

    plain = build_model(section(), 10)
    evit = build_model(section(method="evit", keep_rate=0.5, drop_loc=[2]), 10)
    tome = build_model(section(method="tome", r=3), 10)
    assert type(plain) is timm.models.VisionTransformer
    assert isinstance(evit, EViT) and evit.drop_loc == (2,) and evit.blocks[2].keep_rate == 0.5
    assert isinstance(tome, ToMe) and tome.r == [3] * 12
    shapes = {k: v.shape for k, v in plain.state_dict().items()}
    for model in (evit, tome):
        assert {k: v.shape for k, v in model.state_dict().items()} == shapes
        model.load_state_dict(plain.state_dict())  # strict
    with pytest.raises(ConfigError, match=r"method tome has no model of arch 'vit_small_patch16_384' "
                                          r"\(timm has no 'tome_vit_small_patch16_384'\)"):
        build_model(section(method="tome", r=3) | {"arch": "vit_small_patch16_384"}, 10)


# Every method, reduction on, at a small size: 64 patches, 4 blocks, tokens reorganized in blocks 1 and 2.
SMALL = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2)
REDUCING = [  # model, its reduction, the same model reducing nothing (None: a pass always reorders its tokens)
    ("evit_deit_tiny_patch16_224", dict(keep_rate=0.7, fuse_token=True, drop_loc=(1, 2)), dict(keep_rate=1.0)),
    ("tome_deit_tiny_patch16_224", dict(r=6), dict(r=0)),
    ("dynamicvit_deit_tiny_patch16_224", dict(base_rate=0.7, pruning_loc=(1, 2)), None),
]


@pytest.mark.parametrize("name, reduction, unreduced", REDUCING)
def test_forward_intermediates_end_at_the_reduced_models_features(name, reduction, unreduced):
    """timm's contract (its tests/test_models.py): the final output is `forward_features`; the intermediates are
    the blocks' tokens before the final norm, here the reduced model's own, in NLC; NCHW only while they form a grid."""
    from evit.methods import METHODS

    model = make(name, **SMALL, **reduction)
    assert model.pass_parameter == next(m.override for m in METHODS.values() if name.startswith(m.prefix or " "))
    x = images(size=64)
    with torch.inference_mode():
        final, inter = model.forward_intermediates(x, return_prefix_tokens=True)
        counts = model.token_counts()
        assert [tokens.shape[1] for tokens, _ in inter] == [t.mlp - 1 for t in counts]
        assert counts[-1].mlp < 65  # the pass reduced its tokens
        assert torch.equal(final, model.forward_features(x))
        tokens, cls = inter[-1]
        assert torch.equal(model.norm(torch.cat([cls, tokens], dim=1)), final)
    with pytest.raises(ValueError, match=fr"{type(model).__name__}.forward_intermediates: output_fmt='NCHW' needs "
                                         r"tokens on their patch grid.*use output_fmt='NLC'"):
        model.forward_intermediates(x, output_fmt="NCHW")
    if unreduced:
        _, grids = model.forward_intermediates(x, output_fmt="NCHW", **unreduced)
        assert [g.shape for g in grids] == [(2, 32, 8, 8)] * 4


@pytest.mark.parametrize("name, reduction, _", REDUCING)
def test_features_only_gives_the_reduced_blocks_tokens(name, reduction, _):
    """`features_only=True` as timm builds it for a ViT: forward_intermediates' last 3 blocks (NLC)."""
    model = make(name, **SMALL, **reduction)
    features = make(name, **SMALL, **reduction, features_only=True)
    features.model.load_state_dict(model.state_dict(), strict=False)  # features_only drops the head
    assert features.feature_info.channels() == [32] * 3 and features.output_fmt == "NLC"
    x = images(size=64)
    with torch.inference_mode():
        expected = model.forward_intermediates(x, indices=3, intermediates_only=True)
        got = features(x)
    assert [t.shape[1] for t in got] == [t.mlp - 1 for t in model.token_counts()[1:]]
    assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, expected))


def test_importing_evit_models_registers_every_builtin_methods_models():
    """In a fresh process: importing `evit.models` alone registers the models of each method under evit/models/."""
    import subprocess
    import sys

    program = ("import timm, evit.models\n"
               "from evit.methods import BUILTIN_METHODS\n"
               "for m in BUILTIN_METHODS.values():\n"
               "    if m.prefix: print(m.prefix, len(timm.list_models(m.prefix + '*')))")
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout
    assert dict(line.split() for line in out.splitlines()) == {"evit_": "7", "tome_": "3", "dynamicvit_": "3"}
