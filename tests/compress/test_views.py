"""The vectorised group views agree with the per-group helpers on zoo models (concat, flatten, residuals)."""

from __future__ import annotations

import pytest
import torch

from slimship.compress.groups import group_norms, group_vector, zero_mask
from slimship.compress.views import GroupViews
from slimship.slimming import find_groups
from slimship.slimming.graph import get_tensor, slice_index
from tests.compress.test_base import one_thread
from tests.zoo import build

assert one_thread  # autouse fixture

CASES = ["vgg_bn", "densenet", "resnet_bottleneck", "unet", "vit_sdpa"]


def setup(name: str):
    case = build(name)
    groups = find_groups(case.model, case.example_inputs).groups
    return case, groups, GroupViews(case.model, groups)


def consumer_sq(model, group) -> float:
    total = 0.0
    for name, dim, positions in group.consume:
        t = get_tensor(model, name)
        total += float(t.detach()[slice_index(dim, positions, t.dim())].double().pow(2).sum())
    return total


@pytest.mark.parametrize("name", CASES)
def test_norms_and_taylor_match_the_per_group_helpers(name: str) -> None:
    case, groups, views = setup(name)
    assert len(views.blocks) < len(groups)  # stacked: fewer blocks than groups
    torch.testing.assert_close(views.norms().float(), group_norms(case.model, groups))
    expected = torch.tensor(
        [
            g.double().norm() ** 2 + consumer_sq(case.model, grp)
            for g, grp in zip((group_vector(case.model, grp) for grp in groups), groups)
        ]
    ).sqrt()
    torch.testing.assert_close(views.norms(consumers=True), expected, rtol=1e-12, atol=1e-12)
    out = case.model(*case.example_inputs)
    (out[0] if isinstance(out, tuple | list) else out).pow(2).sum().backward()
    taylor = torch.tensor(
        [
            float(
                (group_vector(case.model, g).double() * group_vector(case.model, g, grad=True).double())
                .sum()
                .abs()
            )
            for g in groups
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(views.taylor(), taylor, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", CASES)
def test_zero_scale_and_write_touch_only_the_chosen_groups(name: str) -> None:
    case, groups, views = setup(name)
    mask = torch.rand(len(groups), generator=torch.Generator().manual_seed(0)) < 0.4
    before = [group_vector(case.model, g).clone() for g in groups]
    views.zero(mask)
    assert mask.any() and zero_mask(case.model, groups) == mask.tolist()
    for g, old, m in zip(groups, before, mask.tolist(), strict=True):
        assert torch.equal(group_vector(case.model, g), torch.zeros_like(old) if m else old)
    for block in views:  # running means of zeroed groups are zero too
        for slot in block.buffers:
            assert bool((slot.read()[mask[block.rows]] == 0).all())
    views.scale(torch.where(mask, 1.0, 0.5).double())
    for g, old, m in zip(groups, before, mask.tolist(), strict=True):
        if not m:
            torch.testing.assert_close(group_vector(case.model, g), old * 0.5)
    for block in views:  # a permuted write reads back permuted
        values = block.matrix()
        flipped = values.flip(0)
        block.set_matrix(flipped)
        assert torch.equal(block.matrix(), flipped)
        block.set_matrix(values)
