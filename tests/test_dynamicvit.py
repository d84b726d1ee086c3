"""DynamicViT at inference: logits against the official models/dyvit.py's inference path written out plainly over a
state dict in the official layout (tiny random weights; synthetic tensors), its token counts and MACs."""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from evit.benchmark import count_macs
from evit.checkpoint import load_pretrained
from evit.models.dynamicvit import DynamicViT

TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=6, num_heads=2, num_classes=7)  # 64 patches


def official_logits(sd: dict, x: torch.Tensor, heads: int, pruning_loc, token_ratio) -> torch.Tensor:
    """The official VisionTransformerDiffPruning.forward when not training, over its state dict `sd`: explicit
    attention, PredictorLG with an all-ones policy, argsort of the keep score, batch_index_select."""
    def ln(t, key, eps=1e-6):
        return F.layer_norm(t, t.shape[-1:], sd[f"{key}.weight"], sd[f"{key}.bias"], eps)

    def lin(t, key):
        return F.linear(t, sd[f"{key}.weight"], sd[f"{key}.bias"])

    B = x.shape[0]
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=sd["patch_embed.proj.weight"]
                 .shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x], dim=1) + sd["pos_embed"]
    init_n = x.shape[1] - 1
    prev_decision = torch.ones(B, init_n, 1)
    p_count = 0
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        if i in pruning_loc:
            p = f"score_predictor.{p_count}"
            h = F.gelu(lin(ln(x[:, 1:], f"{p}.in_conv.0", eps=1e-5), f"{p}.in_conv.1"))
            C = h.shape[-1]
            global_x = (h[:, :, C // 2:] * prev_decision).sum(dim=1, keepdim=True) / torch.sum(prev_decision, dim=1,
                                                                                             keepdim=True)
            h = torch.cat([h[:, :, :C // 2], global_x.expand(B, h.shape[1], C // 2)], dim=-1)
            h = F.gelu(lin(F.gelu(lin(h, f"{p}.out_conv.0")), f"{p}.out_conv.2"))
            pred_score = lin(h, f"{p}.out_conv.4").log_softmax(dim=-1)
            keep_policy = torch.argsort(pred_score[:, :, 0], dim=1, descending=True)[:, :int(init_n * token_ratio[p_count])]
            now_policy = torch.cat([torch.zeros(B, 1, dtype=keep_policy.dtype), keep_policy + 1], dim=1)
            x = torch.stack([x[b, now_policy[b]] for b in range(B)])
            prev_decision = torch.stack([prev_decision[b, keep_policy[b]] for b in range(B)])
            p_count += 1
        k = f"blocks.{i}"
        h = ln(x, f"{k}.norm1")
        N, C = h.shape[1:]
        q, kk, v = lin(h, f"{k}.attn.qkv").reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ kk.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
        x = x + lin((attn @ v).transpose(1, 2).reshape(B, N, C), f"{k}.attn.proj")
        x = x + lin(F.gelu(lin(ln(x, f"{k}.norm2"), f"{k}.mlp.fc1")), f"{k}.mlp.fc2")
    return lin(ln(x, "norm")[:, 0], "head")


def official_state_dict(seed: int = 0) -> dict:
    """Random weights under the official checkpoint's keys (a timm ViT's, and score_predictor.<s>.in_conv/out_conv)."""
    torch.manual_seed(seed)
    model = timm.create_model("dynamicvit_deit_small_patch16_224", pruning_loc=(1, 3, 4), **TINY)
    return {k: torch.randn_like(v) * (0.3 if v.ndim > 1 else 0.1) + (1.0 if k.endswith("norm1.weight") else 0.0)
            for k, v in model.state_dict().items()}


@pytest.mark.parametrize("base_rate", [0.7, 0.5])
def test_logits_equal_the_official_inference_path_on_the_official_layout(tmp_path, base_rate):
    sd = official_state_dict()
    expected_keys = {"score_predictor.2.in_conv.0.weight", "score_predictor.2.in_conv.1.bias",
                     "score_predictor.0.out_conv.4.weight", "blocks.3.attn.qkv.weight", "cls_token", "pos_embed"}
    assert expected_keys <= set(sd)
    torch.save({"model": sd}, tmp_path / "dynamicvit.pth")  # as the official release: {"model": state_dict}
    model = timm.create_model("dynamicvit_deit_small_patch16_224", base_rate=base_rate, pruning_loc=(1, 3, 4), **TINY)
    load_pretrained(model, tmp_path / "dynamicvit.pth")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ratios = [base_rate, base_rate ** 2, base_rate ** 3]
    with torch.no_grad():
        ours, reference = model.eval()(x), official_logits(sd, x, 2, [1, 3, 4], ratios)
        full = official_logits(sd, x, 2, [1, 3, 4], [1.0, 1.0, 1.0])
    print(f"DynamicViT vs official, base_rate {base_rate}: max |logit diff| {(ours - reference).abs().max():.2e}")
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert (full - reference).abs().max() > 1e-2  # pruning changes the function, so the match means something


def test_deit_small_at_0_7_keeps_137_96_67_and_its_macs_count_the_predictors():
    with torch.device("meta"):
        model = timm.create_model("dynamicvit_deit_small_patch16_224", base_rate=0.7)
    counts = model.token_counts()
    assert [t.mlp - 1 for t in counts] == [196] * 3 + [137] * 3 + [96] * 3 + [67] * 3
    assert [i for i, t in enumerate(counts) if t.reorganized] == [2, 5, 8]  # their outputs are scored
    predictors = sum(model.extra_macs(t) for t in counts)
    assert predictors == sum(n * (384 * 384 + 384 * 192 + 192 * 96 + 96 * 2 + 192) for n in (196, 137, 96))
    print(f"DynamicViT-DeiT-S/0.7: {count_macs(model) / 1e9:.3f} GMACs, predictors {predictors / 1e9:.3f}")


def test_macs_equal_torchs_flop_counter():
    torch.manual_seed(0)
    model = timm.create_model("dynamicvit_deit_small_patch16_224", base_rate=0.6, pruning_loc=(1, 3, 4), **TINY).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    # the counter sees matmuls only: the predictors' mean (dim/2 per token) is ours alone
    mean_macs = sum(t.mlp - 1 for t in model.token_counts() if t.reorganized) * 16
    assert counter.get_total_flops() // 2 == count_macs(model) - mean_macs


def test_bad_pruning_loc_and_rate_are_named():
    for pruning_loc in [(0, 3), (3, 3), (4, 2)]:
        with pytest.raises(ValueError, match=fr"pruning_loc must be increasing block indices in 1..5, got "
                                             fr"\[{', '.join(map(str, pruning_loc))}\]"):
            timm.create_model("dynamicvit_deit_small_patch16_224", pruning_loc=pruning_loc, **TINY)
    with pytest.raises(ValueError, match="base_rate must be in"):
        timm.create_model("dynamicvit_deit_small_patch16_224", base_rate=1.5, pruning_loc=(2, 4), **TINY)
    assert isinstance(timm.create_model("dynamicvit_deit_small_patch16_224", pruning_loc=(2, 4), **TINY), DynamicViT)
