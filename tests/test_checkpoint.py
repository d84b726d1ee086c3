"""Loading DeiT / official EViT / our checkpoints, written by the tests themselves."""
import pytest
import timm
import torch

import evit  # noqa: F401
from evit.checkpoint import CheckpointMismatchError, load_pretrained, read_state_dict, save_atomic


@pytest.fixture(scope="module")
def deit_tiny():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224").eval()


def logits(model, size=224):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return model.eval()(x)


@pytest.mark.parametrize("wrap", ["raw", "model", "ddp"])
def test_loads_deit_checkpoint_layouts(tmp_path, deit_tiny, wrap):
    state = deit_tiny.state_dict()
    if wrap == "model":  # official DeiT / EViT releases: {"model": ..., "optimizer": ..., "epoch": ...}
        state = {"model": state, "epoch": 299}
    elif wrap == "ddp":
        state = {"model": {f"module.{k}": v for k, v in state.items()}}
    path = tmp_path / "deit.pth"
    torch.save(state, path)
    model = timm.create_model("evit_deit_tiny_patch16_224", keep_rate=1.0)
    load_pretrained(model, path)
    torch.testing.assert_close(logits(model), logits(deit_tiny), rtol=0, atol=1e-5)


def test_resizes_pos_embed_for_another_input_size(tmp_path, deit_tiny):
    path = tmp_path / "deit.pth"
    torch.save(deit_tiny.state_dict(), path)
    model = timm.create_model("evit_deit_tiny_patch16_224", img_size=272, keep_rate=0.7)
    load_pretrained(model, path)
    assert model.pos_embed.shape == (1, 1 + 17 * 17, 192)
    torch.testing.assert_close(model.pos_embed[:, 0], deit_tiny.pos_embed[:, 0])  # CLS entry kept as is
    assert logits(model, 272).shape == (2, 1000)


def test_drops_a_head_of_another_class_count_with_a_warning(tmp_path, deit_tiny):
    path = tmp_path / "deit.pth"
    torch.save(deit_tiny.state_dict(), path)
    model = timm.create_model("evit_deit_tiny_patch16_224", num_classes=10)
    head_before = model.head.weight.clone()
    with pytest.warns(UserWarning, match="dropping the classifier head"):
        load_pretrained(model, path)
    assert torch.equal(model.head.weight, head_before)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, deit_tiny.blocks[0].attn.qkv.weight)


def test_wrong_architecture_names_the_mismatched_keys(tmp_path, deit_tiny):
    path = tmp_path / "deit_tiny.pth"
    torch.save({"model": deit_tiny.state_dict()}, path)
    model = timm.create_model("evit_deit_small_patch16_224")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"wrong shape .*blocks\.0\.attn\.qkv\.weight"):
        load_pretrained(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched

    shallow = timm.create_model("evit_deit_tiny_patch16_224", depth=6, drop_loc=(3,))
    torch.save(shallow.state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match=r"missing \(\d+\): blocks\.6\."):
        load_pretrained(timm.create_model("evit_deit_tiny_patch16_224"), path)


def test_refuses_pickled_code_and_non_checkpoints(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": print}, evil)  # needs full unpickling
    with pytest.raises(CheckpointMismatchError, match="cannot be read as weights"):
        read_state_dict(evil)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_state_dict(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    torch.save({"epoch": 3}, junk)
    with pytest.raises(CheckpointMismatchError, match="holds no state dict"):
        read_state_dict(junk)


def test_save_atomic_replaces_whole_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "checkpoint.pth"
    save_atomic({"a": torch.ones(3)}, path)
    save_atomic({"a": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(3))
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pth"]

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"a": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(3))  # old file intact
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pth"]
