"""Every registered format on models of the zoo (CNNs, a ViT, GPT-2, a Llama, and a Llama slimmed to one
key/value head per layer): each export passes its verdict, and the same verdict on the reference inputs a
release stores (what `slimship verify` re-runs) gives the figures the export recorded.

Quick formats run by default; ExecuTorch and the calibrated int8 files take longer and are marked slow.
"""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch

from slimship import slim, zero_random_groups
from slimship.compare import bounds, judge_cases
from slimship.exporters.registry import FORMATS, ExportRequest, format_of_file
from slimship.runtimes.device_runner import open_runner
from tests.zoo import ZOO

QUICK = {"onnx", "onnx-fp16", "onnx-int8-dynamic", "onnx-int8", "tflite-fp32", "tflite-fp16"}
SLOW = pytest.mark.slow
MODELS = ("mobilenet_v2", "vit_sdpa", "gpt2_lm", "llama_lm", "slim_llama")
SLOW_MODELS = ("mobilenet_v2", "slim_llama")


@cache
def model_case(name: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], list[tuple[torch.Tensor, ...]]]:
    """(model, example inputs, 8 calibration batches drawn like the example)."""
    case = ZOO["llama_lm" if name == "slim_llama" else name]()
    model, example = case.model, case.example_inputs
    if name == "slim_llama":  # half its groups zeroed, then removed: one key/value head per layer is left
        zero_random_groups(model, example, fraction=0.5, seed=0)
        model = slim(model, example).model
    gen = torch.Generator().manual_seed(5)
    return model, example, [case.random_inputs(gen) for _ in range(8)]


def test_the_slim_llama_keeps_one_key_value_head() -> None:
    """The case that litert-torch converted wrongly: a transposed broadcast of a single KV head."""
    model = model_case("slim_llama")[0]
    k_proj = dict(model.named_parameters())["llama.model.layers.0.self_attn.k_proj.weight"]
    assert k_proj.shape[0] == 8  # one head of 8 (the dense model has 2)


def _cases() -> list:
    """Every quick format on every model; the slow ones (ExecuTorch, calibrated int8) on a CNN and the slim
    decoder only, to keep the suite's time (GPT-2's ExecuTorch file: its own test below)."""
    cases = []
    for name in MODELS:
        for fmt, record in FORMATS.items():
            if record.task is not None:  # text-generation formats: tests/decoder
                continue
            if fmt in QUICK:
                cases.append(pytest.param(name, fmt))
            elif name in SLOW_MODELS:
                cases.append(pytest.param(name, fmt, marks=pytest.mark.slow))
    return cases


@pytest.mark.parametrize(("name", "fmt"), _cases())
def test_every_format_passes_its_verdict_and_verify_sees_the_same(name: str, fmt: str, tmp_path) -> None:
    if FORMATS[fmt].extra == "executorch":
        pytest.importorskip("executorch.runtime")
    model, example, calibration = model_case(name)
    record = FORMATS[fmt]
    request = ExportRequest(model, example, example, calibration, calibration, dynamic_batch=True)
    result = record.export(request, tmp_path / record.file_name(name))
    assert result.path.is_file() and result.parity.passed
    if record.family != "executorch":  # a .pte does not say its precision; ONNX and TFLite files do
        assert format_of_file(result.path) == record
    if record.quantised or record.precision == "fp16":
        assert result.parity.top1_agreement is not None
        assert result.parity.top1_agreement >= result.parity.top1_min
    # verify's re-run: the file on the stored reference inputs, judged by the same rule
    outputs = open_runner(str(result.path)).run([t.numpy() for t in example])
    with torch.no_grad():
        expected = [model(*example).numpy()]
    again, _ = judge_cases([expected], [outputs], ["reference"], *bounds(record.precision))
    recorded = result.parity.record()
    assert again.passed, again.reason
    assert math.isclose(again.max_abs_diff, recorded["max_abs_diff"], rel_tol=1e-6, abs_tol=1e-9)
    assert math.isclose(again.tolerance, recorded["tolerance"], rel_tol=1e-9)


@SLOW
def test_gpt2_executorch_falls_back_to_a_fixed_batch_and_passes(tmp_path) -> None:
    """ExecuTorch cannot lower GPT-2 with a dynamic batch (a view its memory planner sees as static on a
    dynamic base): the export fixes the example's batch, says so, and the file passes its verdict."""
    pytest.importorskip("executorch.runtime")
    model, example, _ = model_case("gpt2_lm")
    record = FORMATS["executorch-fp32"]
    request = ExportRequest(model, example, example, dynamic_batch=True)
    result = record.export(request, tmp_path / record.file_name("gpt2"))
    assert result.parity.passed and result.dynamic_batch is False
    (note,) = [n for n in result.notes if n.startswith("batch fixed to 2: ExecuTorch cannot lower")]
    assert "_ViewSpec" in note and "Way out" not in note
