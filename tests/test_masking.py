"""The masking experiment (the paper's Figure 1 / Table 1): which patches each way masks, the boxes in the
evaluation frame, dropping tokens, and the box files."""
import re

import pytest
import timm
import torch
from PIL import Image, ImageDraw

from evit.boxes import check_mask, read_boxes
from evit.errors import ConfigError
from evit.config.schema import resolve_config
from evit.config.masking import resolve_mask
from evit.data.transforms import build_transform
from evit.masking import WAYS, MaskedVal, choose_masks, eval_frame, masked_inputs, object_patches


def test_each_way_masks_the_same_number_of_patches_in_its_own_region():
    obj = object_patches([(14, 14, 42, 35)], img_size=56, patch=7)  # patch centres 3.5, 10.5, ...: cols 2-5, rows 2-4
    assert obj.view(8, 8).nonzero().tolist() == [[r, c] for r in range(2, 5) for c in range(2, 6)]
    masks = choose_masks(obj, share=0.25, seed=3)
    assert masks.sum(1).tolist() == [12, 12, 12]  # round(0.25 * 64) = 16, but the object has 12 patches
    assert not (masks[WAYS.index("background")] & obj).any()
    assert (masks[WAYS.index("object")] == obj).all()
    assert torch.equal(masks, choose_masks(obj, 0.25, 3)) and not torch.equal(masks, choose_masks(obj, 0.25, 4))
    small = choose_masks(obj, share=0.1, seed=0)
    assert small.sum(1).tolist() == [6, 6, 6] and (small[1] <= obj).all() and (small[0] <= ~obj).all()


def test_dropping_masked_tokens_equals_removing_them_from_the_sequence():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=28, patch_size=7, embed_dim=32, depth=3,
                              num_heads=2, num_classes=5).eval()
    images = torch.randn(3, 3, 28, 28)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    for i, drop in enumerate(([0, 5, 6], [15], [1, 2, 3, 4, 9, 10])):
        mask[i, drop] = True
    with torch.no_grad():
        ours = model(**masked_inputs(model, images, mask, "drop"))
        for i in range(3):  # the reference: the sequence without the masked patches' tokens
            x = model._pos_embed(model.patch_embed(images[i:i + 1]))
            x = torch.cat([x[:, :1], x[:, 1:][:, ~mask[i]]], dim=1)
            reference = model.head(model.norm(model.blocks(x))[:, 0])
            torch.testing.assert_close(ours[i:i + 1], reference, rtol=1e-5, atol=1e-5)
        zeroed = masked_inputs(model, images, mask, "zero")["x"]
    assert (zeroed[0, :, :7, :7] == 0).all() and torch.equal(zeroed[0, :, :7, 7:14], images[0, :, :7, 7:14])


@pytest.mark.parametrize("size", [(500, 375), (300, 450)])
def test_boxes_follow_the_evaluation_transform(size):
    """A white box drawn on a black image lands, after DeiT's evaluation transform, where `eval_frame` puts it."""
    box = (120, 90, 260, 300) if size[0] > size[1] else (40, 200, 250, 420)
    img = Image.new("RGB", size)
    ImageDraw.Draw(img).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill="white")
    out = build_transform("deit", False, 224, (0, 0, 0), (1, 1, 1))(img)[0]
    rows, cols = (out > 0.5).any(1).nonzero().squeeze(1), (out > 0.5).any(0).nonzero().squeeze(1)
    x0, y0, x1, y1 = eval_frame([box], *size, 224, 0.875)[0]
    seen = (cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1)
    assert max(abs(a - b) for a, b in zip(seen, (x0, y0, min(x1, 224), min(y1, 224)))) <= 1.5, (seen, (x0, y0, x1, y1))


def test_the_demo_box_is_the_garments_square_on_the_canvas():
    cfg = resolve_config({"model": {"arch": "deit_tiny_patch16_224", "method": "none", "img_size": 42, "patch_size": 7},
                          "data": {"dataset": "fashion_mnist", "canvas": 42, "canvas_step": 7, "val_subset": 50},
                          "train": {"recipe": "demo", "augment": "demo"}})
    val = MaskedVal(cfg, resolve_mask({"share": 0.4}))
    black = (0 - cfg["data"]["mean"][0]) / cfg["data"]["std"][0]
    for j in range(len(val)):
        image, _, masks = val[j]
        (x0, y0, x1, y1), = val.image_boxes(val.indices[j], val.raw[val.indices[j]][0])
        assert (x0, y0, x1, y1) == (7, 7, 35, 35)
        outside = torch.ones(42, 42, dtype=torch.bool)
        outside[7:35, 7:35] = False
        assert torch.allclose(image[:, outside], torch.tensor(black))  # nothing of the garment outside its box
        assert masks.sum(1).tolist() == [14, 14, 14]  # round(0.4 * 36); 16 garment patches, 20 of background


def test_box_files_are_read_and_bad_ones_named(tmp_path):
    xml = tmp_path / "val"
    xml.mkdir()
    (xml / "ILSVRC2012_val_00000001.xml").write_text(
        "<annotation><size><width>500</width><height>375</height></size>"
        "<object><name>n01751748</name><bndbox><xmin>111</xmin><ymin>108</ymin><xmax>441</xmax><ymax>325</ymax>"
        "</bndbox></object><object><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>3</xmax><ymax>4</ymax></bndbox></object>"
        "</annotation>")
    assert read_boxes(xml, "xml") == {"ILSVRC2012_val_00000001": [(111, 108, 441, 325), (1, 2, 3, 4)]}
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\nILSVRC2012_val_00008726,n02119789 255 142 454 329 n02119789 44 21 322 "
                   "295 \n")
    assert read_boxes(csv, "csv") == {"ILSVRC2012_val_00008726": [(255, 142, 454, 329), (44, 21, 322, 295)]}

    (xml / "ILSVRC2012_val_00000000.xml").write_text("<annotation><object><bndbox><xmin>1</xmin></bndbox>")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 1 2 3\n")
    for section, message in [
        ({"share": 0.5, "boxes": str(xml), "boxes_format": "xml"}, f"mask.boxes: {xml}/ILSVRC2012_val_00000000.xml is not an"),
        ({"share": 0.5, "boxes": str(bad_csv), "boxes_format": "csv"}, f"{bad_csv} line 2: expected"),
        ({"share": 0.5, "boxes": str(tmp_path / "nope.csv"), "boxes_format": "csv"}, "nope.csv does not exist"),
        ({"share": 0.5, "boxes": str(csv), "boxes_format": "xml"}, f"{csv} is not a folder of ILSVRC2012"),
        ({"share": 1.5}, "mask.share must be a number in (0, 1)"),
        ({"share": 0.5, "shares": 1}, "unknown mask key(s) ['shares']"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_mask(section)
