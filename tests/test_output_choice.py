"""Multi-output models: TorchRunner flattens outputs like the exporters; `data.output` picks the logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimship.data import evaluate_accuracy, output_index
from slimship.errors import ConfigError, SlimshipError
from slimship.runtimes.torch_runner import TorchRunner


class Nested(torch.nn.Module):
    def forward(self, x: torch.Tensor):
        return {"cls": x[:, :3] * 2, "aux": (x[:, 3:] + 1, x.sum(dim=1))}


def test_torch_runner_flattens_a_nested_dict_output_in_export_order():
    x = np.arange(10, dtype=np.float32).reshape(2, 5)
    outs = TorchRunner(Nested()).run([x])
    np.testing.assert_array_equal(outs[0], x[:, :3] * 2)
    np.testing.assert_array_equal(outs[1], x[:, 3:] + 1)
    np.testing.assert_array_equal(outs[2], x.sum(axis=1))


def test_output_index_by_key_index_and_refusals():
    out = Nested()(torch.zeros(1, 5))
    assert output_index(out, "cls") == 0
    assert output_index(out, "aux.0") == 1
    assert output_index(out, 2) == 2
    with pytest.raises(
        ConfigError, match=r"3 named outputs \(0 'cls' \[1, 3\], 1 'aux.0' \[1, 2\], 2 'aux.1'"
    ):
        output_index(out, None)
    with pytest.raises(ConfigError, match=r"'data\.output' is 'box'"):
        output_index(out, "box")
    assert output_index((torch.zeros(1, 3), torch.zeros(1)), None) == 0  # a tuple: its first output


def test_evaluate_accuracy_reads_the_chosen_output():
    x = torch.tensor([[0.0, 5.0, 0.0, 9.0, 0.0], [7.0, 0.0, 0.0, 9.0, 0.0]])
    batches = [(x, torch.tensor([1, 0]))]
    assert evaluate_accuracy(Nested(), batches, "cls") == 100.0  # argmax of x[:, :3]: 1, 0
    assert evaluate_accuracy(Nested(), batches, "aux.0") == 50.0  # argmax of x[:, 3:] + 1: 0, 0
    with pytest.raises(
        SlimshipError, match=r"selected by data.output='aux.1' must be \(batch, classes\) logits"
    ):
        evaluate_accuracy(Nested(), batches, "aux.1")
