"""torch.compile without graph breaks, and torch.export / ONNX export for inference, on every backbone.

Graph-break checks use ``fullgraph=True`` with a recording backend (no code generation), so they
are fast; one real inductor compile is marked slow. Models are depth 1-2 on 32 px images.
"""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from torch import nn

import finetune  # noqa: F401  (registers the models)
from finetune.backbones.irpe import bucket_ids
from finetune.backbones.spvit import offset_table

TINY = dict(embed_dim=64, num_heads=2, img_size=32)
IRPE_CONFIGS = [
    dict(method="product", mode="bias", rpe_on="k"),
    dict(method="cross", mode="bias", rpe_on="q"),
    dict(method="euc", mode="bias", rpe_on="qk", shared_head=False),
    dict(method="product", mode="ctx", rpe_on="k"),
    dict(method="quant", mode="ctx", rpe_on="q", ratio=33),
    dict(method="product", mode="ctx", rpe_on="v"),
    dict(method="cross", mode="ctx", rpe_on="qkv", shared_head=False),
]


def irpe_model(rpe: dict, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("irpe_deit_tiny_patch16_224", depth=1, patch_size=8, rpe_config=rpe, **{**TINY, **kwargs})
    randomize_rpe_tables(model)
    return model.eval()


def spvit_model() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("spvit_small_patch16_224", depth=2, sp_layers=1, stem_channels=8, **TINY)
    for name, param in model.named_parameters():  # w2 = 0 at init would make the prior constant
        if name.endswith(".w2"):
            nn.init.normal_(param, std=0.5)
    return model.eval()


def randomize_rpe_tables(model: nn.Module) -> None:
    """RPE tables start at zero; random values make every bucket count in the outputs."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".rpe_" in name:
                param.normal_(std=0.5)


class GraphRecorder:
    """A torch.compile backend that keeps every FX graph Dynamo hands it and runs it unchanged."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
        self.graphs.append(gm)
        return gm

    def ops(self) -> set[str]:
        return {str(node.target) for gm in self.graphs for node in gm.graph.nodes if node.op == "call_function"}


def images(batch: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch * 1000 + size))


def compile_and_compare(model: nn.Module, x: torch.Tensor, recorder: GraphRecorder) -> None:
    """Compile with fullgraph=True (a graph break raises), check the output and that no grid arithmetic
    (arange for offsets) is left in the graph: bucket ids and offsets are constants."""
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. Dynamo tracing through an lru_cache wrapper
        compiled = torch.compile(model, fullgraph=True, backend=recorder)
        out = compiled(x)
    torch.testing.assert_close(out, model(x))
    assert recorder.graphs, "the backend saw no graph"
    assert not any("arange" in op for op in recorder.ops()), sorted(recorder.ops())


@pytest.mark.parametrize("rpe", IRPE_CONFIGS, ids=lambda c: f"{c['mode']}-{c['method']}-{c['rpe_on']}")
def test_irpe_compiles_in_one_graph_with_constant_bucket_ids(rpe):
    compile_and_compare(irpe_model(rpe), images(), GraphRecorder())


def test_spvit_compiles_in_one_graph_with_constant_offsets():
    compile_and_compare(spvit_model(), images(), GraphRecorder())


def test_compiled_training_step_matches_eager_gradients():
    """AOTAutograd (forward + backward graphs) through iRPE on q, k and v: same loss and gradients."""
    model = irpe_model(dict(method="cross", mode="ctx", rpe_on="qkv")).train()
    x, labels = images(), torch.tensor([1, 2])

    def grads(module: nn.Module) -> dict[str, torch.Tensor]:
        module.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(module(x), labels).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    expected = grads(model)
    torch._dynamo.reset()
    got = grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)
    assert got["blocks.0.attn.rpe_v.rp_rows.lookup_table_weight"].abs().sum() > 0


def test_dynamic_image_sizes_recompile_per_grid_without_breaks():
    """dynamic_img_size: a new grid gives a new graph (the ids are constants of one grid), never a break."""
    model = irpe_model(dict(method="product", mode="ctx", rpe_on="qk"), dynamic_img_size=True)
    recorder = GraphRecorder()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=recorder)
    for size in (32, 40, 48):
        for batch in (2, 3):
            x = images(batch, size)
            torch.testing.assert_close(compiled(x), model(x))
    assert 3 <= len(recorder.graphs) <= 6
    assert not any("arange" in op for op in recorder.ops())


BATCH = {0: torch.export.Dim("batch", min=1, max=64)}


def export_and_compare(model: nn.Module, x: torch.Tensor, strict: bool) -> torch.export.ExportedProgram:
    """Export with a dynamic batch; the program must match eager on the example and on another batch size."""
    program = torch.export.export(model, (x,), dynamic_shapes=(BATCH,), strict=strict)
    torch.testing.assert_close(program.module()(x), model(x))
    other = images(5, x.shape[-1])
    torch.testing.assert_close(program.module()(other), model(other))
    return program


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize(
    "rpe", [IRPE_CONFIGS[0], IRPE_CONFIGS[-1]], ids=lambda c: f"{c['mode']}-{c['method']}-{c['rpe_on']}"
)
def test_irpe_exports_with_bucket_ids_as_constants(rpe, strict):
    program = export_and_compare(irpe_model(rpe), images(), strict)
    constants = [spec for spec in program.graph_signature.input_specs if spec.kind.name == "CONSTANT_TENSOR"]
    assert constants, "bucket ids should be constant inputs of the exported program"
    assert all(program.constants[spec.target].dtype == torch.long for spec in constants)
    assert not any("arange" in str(node.target) for node in program.graph.nodes)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_spvit_exports(strict):
    program = export_and_compare(spvit_model(), images(), strict)
    assert not any("arange" in str(node.target) for node in program.graph.nodes)


def test_export_on_an_uncached_grid_leaves_real_tensors_in_the_caches():
    """Exporting traces with fake tensors; a cache miss then must not store a FakeTensor (which broke
    every later eager forward on that grid)."""
    bucket_ids.__wrapped__.cache_clear()
    offset_table.__wrapped__.cache_clear()
    for model in (irpe_model(dict(method="product", mode="ctx", rpe_on="k"), img_size=24), spvit_model()):
        x = images(2, model.patch_embed.img_size[0])
        program = torch.export.export(model, (x,))
        eager = model(x)
        assert type(eager) is torch.Tensor
        torch.testing.assert_close(program.module()(x), eager)
    ids = bucket_ids("product", 3, 3, irpe_model(dict(method="product")).rpe_config, torch.device("cpu"))
    assert type(ids) is torch.Tensor
    offsets, index = offset_table(4, 4, torch.device("cpu"))
    assert type(offsets) is torch.Tensor and type(index) is torch.Tensor


@pytest.mark.parametrize("name", ["irpe", "spvit"])
def test_onnx_export_matches_eager(name, tmp_path):
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript (the dev extra)")
    ort = pytest.importorskip("onnxruntime", reason="running the ONNX model needs onnxruntime (the dev extra)")
    model = irpe_model(dict(method="cross", mode="ctx", rpe_on="qkv")) if name == "irpe" else spvit_model()
    x = images()
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False, dynamic_shapes=(BATCH,))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for batch in (x, images(3)):
        (out,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
        torch.testing.assert_close(torch.from_numpy(out), model(batch).detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_inductor_compile_matches_eager():
    """One real code-generating compile (inductor, CPU): iRPE contextual product on q, k, v."""
    model = irpe_model(dict(method="product", mode="ctx", rpe_on="qkv"))
    x = images()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
