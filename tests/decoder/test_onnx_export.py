"""ONNX with past key/values from the Python API: fp32 decodes transformers' greedy tokens on a slim
decoder whose layers keep different KV head counts; int4 (MatMulNBits) is smaller and agrees with it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from slimship.decoder import DecoderExportOptions, export_decoder, greedy, open_decoder
from slimship.decoder.runner import ONNX_METADATA_KEY
from slimship.errors import SlimshipError
from slimship.runtimes.profile import SCOPES_KEY
from tests.decoder.tiny import tiny_slim_llama

pytestmark = pytest.mark.slow  # two ONNX exports and a slim: 30-160 s on a shared 2-core host


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("onnx")
    tokens = np.random.default_rng(3).integers(0, 96, (2, 24))
    options = DecoderExportOptions(max_seq_len=40, calibration=tuple(map(tuple, tokens.tolist())),
                                   calibration_source="2 sequences from the test")  # fmt: skip
    return export_decoder(tiny_slim_llama(), ["onnx", "onnx-int4"], out, "slim", options)


def test_onnx_fp32_decodes_the_reference_tokens(exported):
    result = exported["onnx"]
    assert result.path.name == "slim.onnx" and result.kv_heads == [1, 2]
    assert result.parity.tokens_match and result.parity.max_abs_diff <= result.parity.tolerance
    proto = onnx.load(str(result.path))
    names = [i.name for i in proto.graph.input]
    assert names[:2] == ["input_ids", "position_ids"] and names[2] == "past_key_values.0.key"
    shapes = {
        i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in proto.graph.input
    }
    assert shapes["past_key_values.0.key"][1] == 1 and shapes["past_key_values.1.key"][1] == 2  # per layer
    assert isinstance(shapes["past_key_values.0.key"][2], str)  # a dynamic past length
    meta = json.loads({p.key: p.value for p in proto.metadata_props}[ONNX_METADATA_KEY])
    assert meta["max_seq_len"] == 40 and meta["eos_ids"] == [2]
    kept = {p.key for node in proto.graph.node for p in node.metadata_props}
    assert kept <= {SCOPES_KEY}  # no per-node stack traces; only the module scope the decode profile names


def test_onnx_int4_is_smaller_and_agrees_on_the_given_tokens(exported):
    fp32, int4 = exported["onnx"], exported["onnx-int4"]
    assert int4.path.name == "slim.int4.onnx"
    assert int4.bytes < 0.5 * fp32.bytes
    assert int4.parity.calibration == "2 sequences from the test" and int4.parity.positions == 48
    assert int4.parity.top1_agreement >= 0.5
    assert int4.parity.perplexity > 0 and int4.parity.reference_perplexity > 0
    assert "MatMulNBits" in int4.notes[0]


def test_a_runner_refuses_what_does_not_fit(exported):
    decoder = open_decoder(exported["onnx"].path)
    with pytest.raises(SlimshipError, match="exceed the file's cache of 40"):
        greedy(decoder, [1] * 30, 20)
    with pytest.raises(SlimshipError, match=r"outside the vocabulary \[0, 96\)"):
        greedy(decoder, [1, 500], 2)
