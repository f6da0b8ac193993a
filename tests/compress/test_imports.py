"""Models pruned elsewhere: torch.nn.utils.prune masks, zeroed channels, plain checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import prune

from slimship.compress import compress, load_state_checkpoint, make_prune_permanent
from slimship.errors import ModelFileError
from tests.compress.test_base import TinyNet, check_slims, example, one_thread, tiny_model

assert one_thread  # autouse fixture


def _structured(model):
    """Zero half the output channels of each conv with torch's pruning utilities (and their BN)."""
    for conv, bn in ((model.conv1, model.bn1), (model.conv2, model.bn2)):
        prune.ln_structured(conv, "weight", amount=0.5, n=2, dim=0)
        keep = conv.weight_mask.flatten(1).any(1).float()
        for name in ("weight", "bias"):
            prune.custom_from_mask(bn, name, keep)
        if conv.bias is not None:
            prune.custom_from_mask(conv, "bias", keep)
    return model


def test_prune_masks_made_permanent_and_slim() -> None:
    model = _structured(tiny_model())
    result = compress("import", model, example(), None)
    names = dict(result.model.named_parameters())
    assert "conv1.weight" in names and "conv1.weight_orig" not in names
    assert result.info["per_space"] == {"conv1.weight[0]": [4, 8], "conv2.weight[0]": [6, 12]}
    assert "conv1.weight_orig" in dict(model.named_parameters())  # the caller's model is untouched
    check_slims(result.model)


def test_tol_snaps_dust_to_zero() -> None:
    model = tiny_model()
    with torch.no_grad():
        model.conv1.weight[0] = 1e-12
        model.bn1.weight[0] = 1e-12
        model.bn1.bias[0] = 0
    assert compress("import", model, example(), None).info["per_space"]["conv1.weight[0]"][0] == 0
    assert compress("import", model, example(), None, tol=1e-9).info["per_space"]["conv1.weight[0]"][0] == 1


def test_state_dict_with_masks_loads_into_factory(tmp_path) -> None:
    pruned = _structured(tiny_model())
    path = tmp_path / "pruned.pt"
    torch.save({"state_dict": pruned.state_dict()}, path)
    model = load_state_checkpoint(path, TinyNet)
    make_prune_permanent(pruned)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), pruned.state_dict().values()))


def test_pickle_needs_opt_in(tmp_path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(tiny_model(), path)
    with pytest.raises(ModelFileError, match=r"whole\.pt.*allow_pickle=True"):
        load_state_checkpoint(path, TinyNet)
    assert isinstance(load_state_checkpoint(path, allow_pickle=True), TinyNet)


def test_missing_factory_and_file(tmp_path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(tiny_model().state_dict(), path)
    with pytest.raises(ModelFileError, match="pass the factory"):
        load_state_checkpoint(path)
    with pytest.raises(ModelFileError, match="no such checkpoint"):
        load_state_checkpoint(tmp_path / "missing.pt", TinyNet)
