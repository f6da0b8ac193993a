"""adc_search: the ADC search scored by the user's own `evaluate(model) -> float`, and apply_policy."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimship.compress.adc import DDPG, SearchOptions, adc_search, apply_policy
from slimship.errors import CompressionError
from slimship.slimming.api import count_flops, slim
from tests.compress.gloo import single_process_group
from tests.compress.test_adc import tiny_cnn
from tests.parallel import free_port

ROOT = Path(__file__).resolve().parents[2]
X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
FAST = DDPG(warmup_episodes=4, batch_size=16, updates_per_step=1, hidden=16)


def small_cnn() -> nn.Module:
    """test_adc's small CNN in eval mode (the search scores it as deployed)."""
    return tiny_cnn().eval()


def closeness(reference: nn.Module):
    """An evaluate: how close the pruned model's outputs stay to the dense model's (higher is better)."""
    with torch.no_grad():
        target = reference(X)

    def evaluate(model: nn.Module) -> float:
        with torch.no_grad():
            return -float(F.mse_loss(model(X), target))

    return evaluate


def kept_rows(index: int):
    """An evaluate that prefers keeping the output channels of layer `index` (counts its non-zero rows)."""

    def evaluate(model: nn.Module) -> float:
        weight = model[index].weight.detach()
        return float((weight.flatten(1).abs().sum(1) > 0).float().mean())

    return evaluate


def search(model: nn.Module, evaluate, **options):
    opts = {"target_flops_kept": 0.4, "episodes": 8, "ddpg": FAST, "seed": 1, **options}
    return adc_search(model, (X,), evaluate, **opts)


def test_policy_meets_the_flops_target_and_slims_to_the_zeroed_model() -> None:
    model = small_cnn()
    before = copy.deepcopy(model.state_dict())
    result = search(model, closeness(model))
    for key, value in model.state_dict().items():  # the search worked on a copy
        assert torch.equal(value, before[key]), key
    assert len(result.rewards) == 8 and result.reward == max([*result.rewards, result.uniform_reward])
    assert result.flops_kept <= 0.4 * (1 + 1e-9)
    policy = result.policy
    assert sorted(policy.sizes.values()) == [8, 12, 16]
    assert all(len(policy.removed[s]) == policy.sizes[s] - policy.kept[s] for s in policy.sizes)
    zeroed = apply_policy(copy.deepcopy(model), (X,), policy)
    assert closeness(model)(zeroed) == pytest.approx(result.reward, rel=1e-6)  # the policy it scored
    slimmed = slim(zeroed, (X,))
    dense_flops = count_flops(model, (X,))
    assert slimmed.flops_after <= 0.4 * dense_flops * 1.001
    assert slimmed.flops_after == pytest.approx(result.flops_kept * dense_flops, rel=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(slimmed.model(X), zeroed(X), rtol=1e-4, atol=1e-5)


def test_evaluate_steers_the_policy() -> None:
    """Preferring conv1's channels (8) or the hidden linear's (16) moves the kept fractions that way."""
    model = small_cnn()
    conv = search(model, kept_rows(0), seed_uniform=False).policy
    linear = search(model, kept_rows(7), seed_uniform=False).policy
    by_size = {size: space for space, size in conv.sizes.items()}
    conv_space, linear_space = by_size[8], by_size[16]
    assert conv.fractions[conv_space] > linear.fractions[conv_space]
    assert linear.fractions[linear_space] > conv.fractions[linear_space]


def test_same_seed_same_policy_and_the_global_rng_is_left_alone() -> None:
    model = small_cnn()
    state = torch.random.get_rng_state()
    a = search(model, closeness(model), episodes=10)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = search(model, closeness(model), episodes=10)
    assert a.policy == b.policy and a.rewards == b.rewards and a.episodes == b.episodes


def test_an_options_object_gives_the_same_search_and_unknown_names_are_refused() -> None:
    model = small_cnn()
    flat = search(model, closeness(model), episodes=6)
    options = SearchOptions(target_flops_kept=0.4, episodes=6, ddpg=FAST, seed=1)
    typed = adc_search(model, (X,), closeness(model), options)
    assert typed.policy == flat.policy and typed.rewards == flat.rewards
    assert adc_search(model, (X,), closeness(model), options, episodes=6).rewards == flat.rewards
    with pytest.raises(
        CompressionError, match="adc_search has no option 'episode'; allowed options: calibrate"
    ):
        adc_search(model, (X,), closeness(model), options, episode=6)
    with pytest.raises(CompressionError, match="adc_search options must be an options object"):
        adc_search(model, (X,), closeness(model), {"episodes": 6})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (math.nan, r"returned nan, not a finite float at episode 0 \(the uniform policy\)"),
        (math.inf, r"returned inf, not a finite float at episode 0"),
        ("0.5", r"returned str '0\.5', not a float at episode 0"),
        (None, r"returned NoneType 'None', not a float"),
    ],
)
def test_evaluate_returning_no_finite_float_names_the_episode(value, message) -> None:
    with pytest.raises(CompressionError, match=message):
        search(small_cnn(), lambda model: value)


def test_a_bad_value_in_a_later_episode_names_that_episode() -> None:
    calls = []

    def evaluate(model: nn.Module) -> float:
        calls.append(1)
        return 0.5 if len(calls) < 3 else math.nan

    with pytest.raises(CompressionError, match=r"at episode 2 of the adc search"):
        search(small_cnn(), evaluate)


def test_a_single_process_gloo_group_and_ddp_wrapper_give_the_same_policy(tmp_path: Path) -> None:
    model = small_cnn()
    alone = search(model, closeness(model))
    with single_process_group(tmp_path):
        wrapped = nn.parallel.DistributedDataParallel(model)
        grouped = search(wrapped, closeness(model))
        del wrapped  # a DDP reducer must not outlive its process group (its teardown then hangs)
    assert grouped.policy == alone.policy and grouped.rewards == alone.rewards


def test_apply_policy_on_another_architecture_names_the_space() -> None:
    policy = search(small_cnn(), closeness(small_cnn()), episodes=1, search="uniform").policy
    wider = small_cnn()
    wider[7], wider[9] = nn.Linear(12, 20), nn.Linear(20, 10)
    with pytest.raises(CompressionError, match=r"has 16 channel groups but this model has 20"):
        apply_policy(wider, (X,), policy)


def test_readme_adc_example_runs(tmp_path: Path) -> None:
    """The README's "Search with your own validation (ADC)" example runs and prints a slimmer model."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Search with your own validation (ADC)") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    flops = re.search(r"flops (\d+) -> (\d+)", done.stdout)
    assert flops is not None, done.stdout
    assert int(flops.group(2)) <= 0.5 * int(flops.group(1)) * 1.001


@pytest.mark.slow  # two torchrun processes importing torch and tracing the model: ~40 s on a loaded machine
def test_two_processes_with_different_evaluates_end_with_the_same_policy(tmp_path: Path) -> None:
    """torchrun, 2 gloo processes whose evaluates differ: one policy on both ranks, the one a single
    process finds with the mean of both evaluates (each evaluate alone leads to another policy)."""
    import shutil

    from tests.compress import ddp_adc

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun is not None
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc_per_node=2", "--master_port", str(free_port())]
    cmd += ["-m", "tests.compress.ddp_adc", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"adc-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert ranks[0] == json.loads(json.dumps(ddp_adc.run(ddp_adc.mean_of_ranks)))
    alone = [json.loads(json.dumps(ddp_adc.run(kept_rows(layer)))) for layer in ddp_adc.LAYERS]
    assert alone[0]["policy"] != alone[1]["policy"]  # without the mean the ranks would disagree


def _no_search(*args, **kwargs):
    raise AssertionError("a bad argument must be refused before any search")


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda: adc_search("model", (X,), lambda m: 0.0), "adc_search model must be a torch nn.Module"),
        (
            lambda: search(small_cnn(), lambda m: 0.0, calibrate=[X]),
            r"calibrate\[0\] must be an \(inputs, targets\)",
        ),
        (lambda: search(small_cnn(), lambda m: 0.0, calibrate=5), "calibrate must be an iterable"),
        (lambda: search(small_cnn(), lambda m: 0.0, episodes=True), "'episodes' must be an int >= 1"),
        (lambda: search(small_cnn(), lambda m: 0.0, seed="x"), "option 'seed' must be an int >= 0"),
        (lambda: search(small_cnn(), lambda m: 0.0, ddpg={"hidden": 8}), "ddpg must be a DDPG"),
        (lambda: search(small_cnn(), lambda m: 0.0, min_keep="0.1"), "'min_keep' must be a number in"),
        (
            lambda: apply_policy(small_cnn(), (X,), {"0.weight[0]": 4}),
            "apply_policy policy must be an AdcPolicy",
        ),
        (lambda: DDPG(warmup_episodes=-1), "DDPG warmup_episodes must be an int >= 0"),
        (lambda: DDPG(batch_size=0), "DDPG batch_size must be an int >= 1"),
        (lambda: DDPG(hidden=2.5), "DDPG hidden must be an int >= 1"),
        (lambda: DDPG(tau=0.0), r"DDPG tau must be a number in \(0, 1\]"),
        (lambda: DDPG(lr_actor=float("nan")), "DDPG lr_actor must be a number"),
    ],
)
def test_bad_arguments_are_refused_naming_the_argument(call, named: str, monkeypatch) -> None:
    from slimship.compress.adc import search as search_module

    monkeypatch.setattr(search_module, "search_policies", _no_search)
    with pytest.raises(CompressionError, match=named):
        call()


def test_calibrate_accepts_a_generator_of_pairs() -> None:
    pairs = ((X, torch.zeros(len(X), dtype=torch.long)) for _ in range(2))
    result = search(small_cnn(), closeness(small_cnn()), episodes=1, search="uniform", calibrate=pairs)
    assert result.policy.kept
