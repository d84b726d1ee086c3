"""EViT and ToMe under `torch.compile`: one graph, no breaks, no recompilation from one pass to the next (dynamo's
counters, with a counting backend: no inductor); ToMe's attention mask suits SDPA's fused kernels; `evit bench
--cuda-graphs` refuses the CPU."""
import pytest
import timm
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel

import evit.models  # noqa: F401  (registers the EViT and ToMe models with timm)
from evit.benchmark import benchmark
from evit.cli import main
from evit.models.tome import MASK_ALIGN, log_size_bias

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)  # 16 patches + CLS


class GraphRecorder(CompileCounter):
    """Counts dynamo's graphs, as `CompileCounter`, and records the functions and methods they call."""

    def __init__(self):
        super().__init__()
        self.calls = set()

    def __call__(self, gm, example_inputs):
        self.calls |= {str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
        return super().__call__(gm, example_inputs)


def make(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **TINY, **kwargs).eval()


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs, override", [
    ("evit_deit_tiny_patch16_224", dict(keep_rate=0.5, fuse_token=True, drop_loc=[0, 1]), dict(keep_rate=0.7)),
    ("tome_deit_tiny_patch16_224", dict(r=3), dict(r=[2, 0])),
])
def test_compiles_to_one_graph_without_breaks_or_recompiles(name, kwargs, override):
    """A pass at the model's own rate or r is one graph, built once. An override sets token counts, so shapes: it
    is static per pass by design, built once on its first use; the model's own rate still finds its graph.
    No sort or argsort: inductor builds them into bitonic-network Triton kernels (slow to compile, one per token
    count), while it calls aten's topk."""
    model = make(name, **kwargs)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    counters.clear()
    backend = GraphRecorder()
    compiled = torch.compile(model, backend=backend)
    with torch.inference_mode():
        expected, expected_override = model(x), model(x, **override)
        for _ in range(3):
            torch.testing.assert_close(compiled(x), expected)
        assert backend.frame_count == 1 and not counters["graph_break"]
        for _ in range(2):
            torch.testing.assert_close(compiled(x, **override), expected_override)
        torch.testing.assert_close(compiled(x), expected)
    assert backend.frame_count == 2 and not counters["graph_break"], dict(counters["graph_break"])
    assert any("topk" in c for c in backend.calls) and not any("sort" in c for c in backend.calls), backend.calls


def test_tome_mask_rows_are_aligned_for_the_fused_kernels():
    """SDPA's memory-efficient CUDA kernel takes a float mask as it is only if every stride but the last is a
    multiple of 8 elements (otherwise it copies the mask into a padded one at each call)."""
    size = torch.tensor([[1.0, 2.0, 3.0, 1.0, 5.0], [4.0, 1.0, 1.0, 2.0, 1.0]])
    bias = log_size_bias(size, torch.bfloat16)
    assert bias.shape == (2, 1, 1, 5) and bias.dtype == torch.bfloat16
    assert bias.stride(-1) == 1 and all(s % MASK_ALIGN == 0 for s in bias.stride()[:-1]), bias.stride()
    torch.testing.assert_close(bias[:, 0, 0].float(), size.log(), rtol=1e-2, atol=0)


def test_tome_runs_on_the_fused_cpu_attention_kernel():
    """With SDPA restricted to its fused kernel (the CPU's flash attention, which takes the float mask), merging
    ToMe gives the math kernel's logits."""
    model = make("tome_deit_tiny_patch16_224", r=3)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            fused = model(x)
        with sdpa_kernel([SDPBackend.MATH]):
            plain = model(x)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


def test_cuda_graphs_need_a_cuda_device(capsys):
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device .* got device 'cpu'"):
        benchmark(["deit_tiny_patch16_224"], cuda_graphs=True)
    assert main(["bench", "deit_tiny_patch16_224", "--cuda-graphs"]) == 2
    assert "cuda_graphs needs a CUDA device" in capsys.readouterr().err
