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
from finetune.backbones import flex

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
    (arange for offsets) is left in the graph: bucket ids and offsets of the built grid are buffers."""
    torch.compiler.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. Dynamo tracing through a cache wrapper
        compiled = torch.compile(model, fullgraph=True, backend=recorder)
        out = compiled(x)
    torch.testing.assert_close(out, model(x))
    assert recorder.graphs, "the backend saw no graph"
    assert not any("arange" in op for op in recorder.ops()), sorted(recorder.ops())


@pytest.mark.parametrize("rpe", IRPE_CONFIGS, ids=lambda c: f"{c['mode']}-{c['method']}-{c['rpe_on']}")
def test_irpe_compiles_in_one_graph_with_bucket_ids_from_buffers(rpe):
    compile_and_compare(irpe_model(rpe), images(), GraphRecorder())


def test_spvit_compiles_in_one_graph_with_offsets_from_buffers():
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
    torch.compiler.reset()
    got = grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)
    assert got["blocks.0.attn.rpe_v.rp_rows.lookup_table_weight"].abs().sum() > 0


def test_dynamic_image_sizes_compile_without_breaks():
    """dynamic_img_size: the built grid reads its ids from buffers; other grids compute them inside the
    graph (plain tensor code), never with a graph break, matching eager on every size and batch."""
    model = irpe_model(dict(method="product", mode="ctx", rpe_on="qk"), dynamic_img_size=True)
    recorder = GraphRecorder()
    torch.compiler.reset()
    compiled = torch.compile(model, fullgraph=True, backend=recorder)
    torch.testing.assert_close(compiled(images(2, 32)), model(images(2, 32)))
    assert len(recorder.graphs) == 1 and not any("arange" in op for op in recorder.ops())
    for size in (40, 48, 24):
        for batch in (2, 3):
            x = images(batch, size)
            torch.testing.assert_close(compiled(x), model(x))
    assert 2 <= len(recorder.graphs) <= 8


def test_compiled_training_step_with_dynamic_sizes_matches_eager_gradients():
    """AOTAutograd through a grid other than the built one (ids computed in the graph)."""
    model = irpe_model(dict(method="product", mode="ctx", rpe_on="k"), dynamic_img_size=True).train()
    x, labels = images(2, 40), torch.tensor([0, 1])
    torch.compiler.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for module in (model, compiled):
        module.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(module(x), labels).backward()
        if module is model:
            expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], msg=name)


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
def test_irpe_exports_with_bucket_ids_as_buffers(rpe, strict):
    program = export_and_compare(irpe_model(rpe), images(), strict)
    buffers = [spec.target for spec in program.graph_signature.input_specs if spec.kind.name == "BUFFER"]
    assert buffers and all(name.endswith("bucket_index") for name in buffers), buffers
    assert not any(spec.persistent for spec in program.graph_signature.input_specs if spec.kind.name == "BUFFER")
    assert not any("arange" in str(node.target) for node in program.graph.nodes)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_spvit_exports(strict):
    program = export_and_compare(spvit_model(), images(), strict)
    assert not any("arange" in str(node.target) for node in program.graph.nodes)


def test_export_leaves_the_eager_model_as_it_was():
    """Exporting traces with fake tensors; the model's buffers and later eager calls stay real."""
    for model in (irpe_model(dict(method="product", mode="ctx", rpe_on="k"), img_size=24), spvit_model()):
        x = images(2, model.patch_embed.img_size[0])
        program = torch.export.export(model, (x,))
        eager = model(x)
        assert type(eager) is torch.Tensor
        assert all(type(buffer) is torch.Tensor for buffer in model.buffers())
        torch.testing.assert_close(program.module()(x), eager)


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
    torch.compiler.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["irpe", "spvit"])
def test_fx_feature_extraction_traces_forward_and_backward(name):
    """timm's FX path (torchvision's feature extractor with timm's leaf modules and wrapped functions),
    as timm's own test_model_forward_fx / backward_fx run it."""
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = irpe_model(dict(method="cross", mode="ctx", rpe_on="qkv")) if name == "irpe" else spvit_model()
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True
    )
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    traced = create_feature_extractor(
        model, train_return_nodes=train_nodes[-1:], eval_return_nodes=eval_nodes[-1:], tracer_kwargs=tracer_kwargs
    )
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(next(iter(traced(x).values())), model(x))
        with warnings.catch_warnings():  # torch.jit.script is deprecated, and timm still tests it
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.script(traced.eval())  # as timm's test_model_forward_fx_torchscript
        torch.testing.assert_close(next(iter(scripted(x).values())), model(x))
    traced.train()
    next(iter(traced(x).values())).mean().backward()
    assert all(param.grad is not None for param in traced.parameters())
    if name == "spvit":  # the size check survives tracing
        with pytest.raises(ValueError, match="give a 5x5 patch grid"):
            traced(images(size=80))


@pytest.mark.slow
def test_compiled_flex_attention_in_cpu_inference_matches_the_default_paths():
    """FlexAttention's generated CPU kernel (compiled on first use) through the layers' own path
    selection, for iRPE on q and k and for SP-SA: the same outputs as the SDPA / per-image paths."""
    for model in (irpe_model(dict(method="product", mode="ctx", rpe_on="qk")), spvit_model()):
        x = images()
        with torch.no_grad():
            expected = model(x)
            assert flex.set_cpu_inference(model) >= 1
            with torch.profiler.profile() as prof:
                got = model(x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        assert any("Compiled" in event.name for event in prof.events()), "the compiled FlexAttention kernel did not run"


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_runs_the_reference_formulas_and_matches_eager():
    """torch.jit.script as timm's test_model_forward_torchscript runs it (eval, scriptable layers): the
    scripted models take the plain per-pair path on the built grid and give the eager outputs."""
    x = images()
    for model in [irpe_model(rpe) for rpe in IRPE_CONFIGS] + [spvit_model()]:
        with torch.no_grad():
            torch.testing.assert_close(torch.jit.script(model)(x), model(x), rtol=1e-4, atol=1e-5)
    dynamic = torch.jit.script(irpe_model(IRPE_CONFIGS[0], dynamic_img_size=True))
    with pytest.raises(torch.jit.Error, match=r"TorchScript: iRPE bucket ids exist for the built \(4, 4\) grid only, not 5x5"):
        dynamic(images(size=40))
