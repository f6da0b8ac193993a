"""slimship.loading: .pt2 files opened without unpickling, hostile files refused, dynamic dims kept."""

from __future__ import annotations

import io
import json
import resource
import time
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from slimship.errors import ModelFileError
from slimship.loading import PickleRequiredError, load_program
from slimship.pt2_checks import check_expression
from tests import pt2_tamper as tamper


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 3),
    ).eval()  # fmt: skip


def save_dynamic(tmp_path: Path, model: nn.Module | None = None) -> tuple[Path, nn.Module]:
    """A .pt2 exported with a dynamic batch (1..64) from an example of batch 2."""
    model = model or _conv_net()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(
        model, (torch.randn(2, 1, 8, 8),), dynamic_shapes=({0: batch},), strict=False
    )
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    return path, model


def test_loads_without_torch_loader_and_matches_it_at_any_batch(tmp_path) -> None:
    path, model = save_dynamic(tmp_path)
    loaded = load_program(path)
    reference = torch.export.load(path).module()
    for batch in (1, 5):
        x = torch.randn(batch, 1, 8, 8)
        assert torch.equal(loaded.module(x), reference(x))
        assert torch.allclose(loaded.module(x), model(x), atol=1e-6)
    assert loaded.examples == "synthesized" and not loaded.pickle_allowed
    (spec,) = loaded.inputs
    assert spec.dtype == torch.float32 and spec.shape == (2, 1, 8, 8)
    assert {k: (v["min"], v["max"]) for k, v in spec.dynamic.items()} == {0: (1, 64)}
    (example,) = loaded.example_inputs
    assert example.shape == (2, 1, 8, 8)  # the dynamic batch at its hint, never 0
    (dims,) = loaded.dynamic_shapes()
    assert set(dims) == {0} and dims[0].min == 1 and dims[0].max == 64


def test_synthesized_token_ids_stay_below_the_embedding_size(tmp_path) -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 4)

        def forward(self, ids: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
            return self.embed(ids.view(-1)).sum() + flags.sum()

    ids = torch.randint(0, 5, (3, 40))
    flags = torch.randint(0, 9, (3,))
    path = tmp_path / "tokens.pt2"
    torch.export.save(torch.export.export(Tokens(), (ids, flags), strict=False), path)
    loaded = load_program(path)
    ids_example, flags_example = loaded.example_inputs
    assert ids_example.dtype == torch.int64 and ids_example.shape == (3, 40)
    assert int(ids_example.max()) < 5 and int(ids_example.max()) >= 2  # spread over the vocabulary
    assert int(flags_example.max()) < 2  # no embedding to bound it: a small range
    loaded.module(*loaded.example_inputs)


def test_unregistered_output_container_loads_as_a_dict(tmp_path) -> None:
    class Named(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": x * 2, "hidden": x + 1}

    x = torch.randn(2, 3)
    source = tmp_path / "dict.pt2"
    torch.export.save(torch.export.export(Named(), (x,), strict=False), source)

    def rename_output_type(doc: dict) -> None:
        signature = doc["graph_module"]["module_call_graph"][0]["signature"]
        signature["out_spec"] = signature["out_spec"].replace(
            "builtins.dict", "transformers.fake.ModelOutput"
        )

    path = tamper.rewrite(
        source,
        tmp_path / "hf.pt2",
        lambda members: tamper.edit_json(members, "models/model.json", rename_output_type),
    )
    with pytest.raises(RuntimeError, match="warnings above"):  # torch's loader hides the real cause
        torch.export.load(path)
    out = load_program(path).module(x)
    assert set(out) == {"logits", "hidden"} and torch.equal(out["logits"], x * 2)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a zip archive", "not a readable torch.export program"),
        (None, "truncated"),  # a real .pt2 cut in half
    ],
)
def test_corrupt_and_truncated_files_name_the_file(tmp_path, content, message) -> None:
    path, _ = save_dynamic(tmp_path)
    bad = tmp_path / "bad.pt2"
    data = path.read_bytes()
    bad.write_bytes(content if content is not None else data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=message) as info:
        load_program(bad)
    assert str(bad) in str(info.value)


def test_archive_without_a_program_or_with_unsafe_names_is_refused(tmp_path) -> None:
    empty = tmp_path / "other.pt2"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("root/readme.txt", "hello")
    with pytest.raises(ModelFileError, match=r"no models/model\.json"):
        load_program(empty)
    escape = tmp_path / "escape.pt2"
    with zipfile.ZipFile(escape, "w") as archive:
        archive.writestr("root/../../evil", "x")
    with pytest.raises(ModelFileError, match="unsafe or unexpected archive member"):
        load_program(escape)
    with pytest.raises(ModelFileError, match="no such file"):
        load_program(tmp_path / "missing.pt2")


def test_hostile_sample_inputs_are_refused_and_only_run_with_consent(tmp_path) -> None:
    path, _ = save_dynamic(tmp_path)
    marker = tmp_path / "pwned"
    hostile = tamper.hostile_sample_inputs(path, tmp_path / "a.pt2", marker, (torch.randn(3, 1, 8, 8),))
    with pytest.raises(PickleRequiredError, match=r"sample_inputs.*io open.*--allow-pickle"):
        load_program(hostile)
    assert not marker.exists()
    loaded = load_program(hostile, allow_pickle=True)  # torch's loader: the payload does run
    assert marker.exists() and loaded.examples == "stored"
    assert loaded.example_inputs[0].shape == (3, 1, 8, 8)


def test_hostile_pickled_weight_is_refused(tmp_path) -> None:
    path, _ = save_dynamic(tmp_path)
    marker = tmp_path / "pwned"
    hostile = tamper.hostile_weight(path, tmp_path / "b.pt2", marker)
    with pytest.raises(PickleRequiredError, match=r"'data/weights/weight_0' \(0.weight\).*--allow-pickle"):
        load_program(hostile)
    assert not marker.exists()
    torch.export.load(hostile)  # what slimship used to do: runs the payload
    assert marker.exists()


def test_hostile_shape_expression_and_operator_are_refused(tmp_path) -> None:
    path, _ = save_dynamic(tmp_path)
    marker = tmp_path / "pwned"
    hostile = tamper.hostile_expression(path, tmp_path / "c.pt2", marker)
    with pytest.raises(ModelFileError, match="refusing shape expression"):
        load_program(hostile)
    assert not marker.exists()
    torch.export.load(hostile)  # sympify evaluates the string
    assert marker.exists()
    marker.unlink()
    target = tamper.hostile_target(path, tmp_path / "t.pt2", f"touch {marker}")
    with pytest.raises(ModelFileError, match=r"refusing operator target 'torch\.serialization\.os\.system'"):
        load_program(target)
    assert not marker.exists()


@pytest.mark.parametrize(
    "text",
    [
        "Symbol('s31', positive=True, integer=True)",
        "Add(Mul(Integer(2), Symbol('s0', integer=True, positive=True)), Integer(-1))",
        "FloorDiv(Symbol('s0', integer=True, positive=True), Integer(2))",
        "Max(Integer(1), Symbol('u3', integer=True))",
    ],
)
def test_real_shape_expressions_pass(text) -> None:
    check_expression(text, "model.json")


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('id')",
        "Symbol('s0').__class__",
        "Symbol('x; import os')",
        "eval('1')",
        "lambda: 0",
        "Symbol('s0', positive=True)[0]",
    ],
)
def test_other_expressions_are_refused(text) -> None:
    with pytest.raises(ModelFileError, match="refusing shape expression"):
        check_expression(text, "model.json")


def test_batch_zero_example_is_refused(tmp_path) -> None:
    path = tmp_path / "empty.pt2"
    torch.export.save(torch.export.export(_conv_net(), (torch.randn(0, 1, 8, 8),), strict=False), path)
    with pytest.raises(ModelFileError, match="batch 0"):
        load_program(path)


def test_stack_traces_do_not_reach_generated_code(tmp_path) -> None:
    path, _ = save_dynamic(tmp_path)
    marker = tmp_path / "pwned"

    def inject(doc: dict) -> None:
        node = doc["graph_module"]["graph"]["nodes"][0]
        node["metadata"]["stack_trace"] = (
            f'File "x", line 1, in f\n  x\rimport builtins; builtins.open("{marker}", "w")'
        )

    hostile = tamper.rewrite(
        path, tmp_path / "s.pt2", lambda m: tamper.edit_json(m, "models/model.json", inject)
    )
    loaded = load_program(hostile)
    loaded.module(torch.randn(2, 1, 8, 8))
    assert not marker.exists()
    assert all("stack_trace" not in n.meta for n in loaded.program.graph.nodes)
    assert json.dumps(str(loaded.module.code)).count("import builtins") == 0


def _insert_from_file(doc: dict, target: str, arg_name: str, file_name: str) -> None:
    """Insert `target(arg_name=file_name, ...)` into the graph (what aten.from_file needs to write a file)."""
    nodes = doc["graph_module"]["graph"]["nodes"]
    node = {
        "target": target, "name": "ff", "metadata": {}, "is_hop_single_tensor_return": None,
        "inputs": [{"name": arg_name, "arg": {"as_string": file_name}, "kind": 1},
                   {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                   {"name": "size", "arg": {"as_int": 64}, "kind": 1}],
        "outputs": [{"as_tensor": {"name": "ff"}}],
    }  # fmt: skip
    nodes.insert(0, node)


@pytest.mark.parametrize(
    ("target", "arg_name", "message"),
    [
        ("torch.ops.aten.from_file.default", "filename", "it reads or writes files"),
        ("torch.ops.aten.add.Tensor", "filename", "refusing string argument 'filename'"),
    ],
)
def test_ops_that_reach_the_file_system_are_refused(tmp_path, target, arg_name, message) -> None:
    """No pickle needed: aten.from_file(shared=True) would create and map any file a graph names."""
    path, _ = save_dynamic(tmp_path)
    victim = tmp_path / "written_by_graph"

    def edit(members: dict[str, bytes]) -> None:
        tamper.edit_json(
            members, "models/model.json", lambda d: _insert_from_file(d, target, arg_name, str(victim))
        )

    hostile = tamper.rewrite(path, tmp_path / "ff.pt2", edit)
    with pytest.raises(ModelFileError, match=message):
        load_program(hostile)
    assert not victim.exists()


def test_a_power_tower_in_a_shape_expression_is_refused_at_once() -> None:
    """sympify would evaluate 9**9**9**9 for ever; srepr writes powers as Pow(...), so '**' never belongs."""
    start = time.perf_counter()
    with pytest.raises(ModelFileError, match=r"operator '\*\*'"):
        check_expression("Symbol('s77', positive=True, integer=True) + 9**9**9**9", "t")
    with pytest.raises(ModelFileError, match="digits"):
        check_expression("Integer(" + "9" * 400 + ")", "t")
    assert time.perf_counter() - start < 1.0


def test_inflating_members_are_refused_before_they_are_read(tmp_path) -> None:
    """A sample-inputs member that is itself a zip bomb (1 MiB of zip inflating to 1 GiB) is refused."""
    path, _ = save_dynamic(tmp_path)
    inner = io.BytesIO()
    with (
        zipfile.ZipFile(inner, "w", compression=zipfile.ZIP_DEFLATED) as archive,
        archive.open("archive/data.pkl", "w", force_zip64=True) as stream,
    ):
        for _ in range(1024):
            stream.write(bytes(1 << 20))
    bomb = inner.getvalue()
    assert len(bomb) < 2 << 20

    def edit(members: dict[str, bytes]) -> None:
        members["data/sample_inputs/model.pt"] = bomb

    hostile = tamper.rewrite(path, tmp_path / "bomb.pt2", edit)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ModelFileError, match="sample-inputs archive"):
        load_program(hostile)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200 * 1024  # KiB: far below 1 GiB


def test_a_deeply_nested_spec_inside_the_program_is_refused_naming_it(tmp_path) -> None:
    x = torch.randn(2, 3)
    source = tmp_path / "plain.pt2"
    torch.export.save(torch.export.export(nn.Linear(3, 2), (x,), strict=False), source)

    def nest_out_spec(doc: dict) -> None:  # JSON inside JSON: 100,000 levels
        signature = doc["graph_module"]["module_call_graph"][0]["signature"]
        signature["out_spec"] = "[" * 100_000 + "]" * 100_000

    path = tamper.rewrite(
        source,
        tmp_path / "deep.pt2",
        lambda members: tamper.edit_json(members, "models/model.json", nest_out_spec),
    )
    with pytest.raises(ModelFileError, match="out_spec: nests deeper"):
        load_program(path)
