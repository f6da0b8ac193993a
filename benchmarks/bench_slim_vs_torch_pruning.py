"""Slimship's slimming engine vs Torch-Pruning (DepGraph) on a ResNet-50 with zeroed channel groups.

    PYTHONPATH=. python benchmarks/bench_slim_vs_torch_pruning.py [--small] [--repeats 3]
        [--fraction 0.4] [--seed 0] [--profile out.prof]

One random-init model gets ~`fraction` of its removable channel groups zeroed (slimship's
`zero_random_groups`). Then, interleaved `--repeats` times, on fresh copies of that same model:

- slimship, split into stages: trace (torch.export), analysis (channel graph + value analysis +
  plan), rewrite, verify (source vs slim on the example and 2 random inputs); plus one end-to-end
  `slimship.slim()` call, which also counts FLOPs and parameters.
- Torch-Pruning: `DependencyGraph().build_dependency(model, example_inputs=x)` (its own trace
  included), then for each group of coupled zeroed channels `get_pruning_group(conv,
  prune_conv_out_channels, idxs).prune()` on the producing conv.

The headline figure is analysis + rewrite vs build + prune; trace and verify are reported beside it.
Both results are checked to have the same parameter count and the same outputs (1e-4 relative).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import logging
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

import slimship
from slimship.slimming.api import _analyse, count_params, find_groups, verify_outputs, zero_random_groups
from slimship.slimming.rewrite import rewrite
from slimship.slimming.trace import trace


# ---- model -------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        width, out = planes, planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, block: type[nn.Module], layers: list[int], num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes, stages = 64, []
        for i, n in enumerate(layers):
            planes = 64 * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(inplanes, planes, 2 if (i > 0 and j == 0) else 1))
                inplanes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def make_model(small: bool) -> nn.Module:
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [2, 2, 2, 2]) if small else ResNet(Bottleneck, [3, 4, 6, 3])
    with torch.no_grad():  # non-trivial BN statistics so that the check is not vacuous
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.0)
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()


# ---- the channels both tools remove ------------------------------------------------------------
def zeroed_channels(model: nn.Module, x: torch.Tensor) -> list[tuple[str, list[int]]]:
    """Per coupled space: (first producing conv's module name, its zeroed output channels)."""
    found = find_groups(model, x)
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    out = []
    for indices in found.by_space.values():
        conv, idxs = None, []
        for i in indices:
            group = found.groups[i]
            if not all(bool((_slice(params, p) == 0).all()) for p in group.produce):
                continue
            name, _, positions = next(p for p in group.produce if p[1] == 0 and params[p[0]].dim() == 4)
            conv = conv or name
            if name != conv:
                raise RuntimeError(f"space produced by {conv} and {name}: pick one conv per space")
            idxs.extend(positions)
        if idxs:
            out.append((conv.rpartition(".")[0], sorted(idxs)))
    return out


def _slice(params: dict[str, torch.Tensor], entry: tuple[str, int, tuple[int, ...]]) -> torch.Tensor:
    name, dim, positions = entry
    return params[name].detach().index_select(dim, torch.tensor(positions))


# ---- timed runs --------------------------------------------------------------------------------
Times = dict[str, tuple[float, float]]  # stage -> (wall seconds, process CPU seconds)


def timed(fn: Callable[[], Any]) -> tuple[Any, tuple[float, float]]:
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, (time.perf_counter() - wall, time.process_time() - cpu)


def run_slimship(model: nn.Module, x: torch.Tensor) -> tuple[Times, nn.Module]:
    """The stages of `slimship.slim` one by one (the deep copies slim makes are not counted)."""
    t: Times = {}
    traced, t["trace"] = timed(lambda: trace(model, (x,)))
    reference, gm = copy.deepcopy(traced.gm), copy.deepcopy(traced.gm)
    analysis, t["analysis"] = timed(lambda: _analyse(gm, True, True, set()))
    _, t["rewrite"] = timed(lambda: rewrite(analysis.graph, analysis.plan))
    check, t["verify"] = timed(lambda: verify_outputs(reference, gm, (x,), rtol=1e-5, n_random=2))
    if not check.passed:
        raise RuntimeError(f"slimship result does not verify: {check}")
    return t, gm


def run_torch_pruning(
    model: nn.Module, x: torch.Tensor, channels: list[tuple[str, list[int]]]
) -> tuple[Times, nn.Module]:
    t: Times = {}

    def build() -> tp.DependencyGraph:
        return tp.DependencyGraph().build_dependency(model, example_inputs=x)

    dep_graph, t["build"] = timed(build)

    def prune() -> None:
        for conv_name, idxs in channels:
            conv = model.get_submodule(conv_name)
            group = dep_graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs)
            group.prune()

    _, t["prune"] = timed(prune)
    return t, model


def _sum(t: Times, *stages: str) -> tuple[float, float]:
    return sum(t[s][0] for s in stages), sum(t[s][1] for s in stages)


# ---- report ------------------------------------------------------------------------------------
def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / a.double().abs().max().clamp_min(1e-12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="ResNet-18-sized net for a quick run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.4, help="fraction of channel groups zeroed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--skip-end-to-end", action="store_true", help="do not also time slimship.slim()")
    parser.add_argument("--profile", help="write a cProfile of one slimship analysis+rewrite here")
    parser.add_argument("--out", help="also write the report to this markdown file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("torch._export").setLevel(logging.ERROR)  # batch 1 specialises: expected
    if args.threads:
        torch.set_num_threads(args.threads)
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    model = make_model(args.small)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(args.seed))
    zeroed = zero_random_groups(model, x, fraction=args.fraction, seed=args.seed)
    channels = zeroed_channels(model, x)
    with torch.no_grad():
        expected = model(x)
    name = "ResNet-18" if args.small else "ResNet-50"
    say(
        f"{name}: {count_params(model) / 1e6:.2f}M params, input 1x3x224x224, {zeroed} channel groups zeroed "
        f"(fraction {args.fraction}) in {len(channels)} coupled spaces; torch {torch.__version__}, "
        f"torch_pruning {tp.__version__}, {torch.get_num_threads()} threads, {args.repeats} interleaved runs"
    )

    runs: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        s_t, slim_model = run_slimship(model, x)
        t_t, tp_model = run_torch_pruning(copy.deepcopy(model), x, channels)
        row = {f"slimship {k}": v for k, v in s_t.items()}
        row |= {f"torch_pruning {k}": v for k, v in t_t.items()}
        row["slimship analysis+rewrite"] = _sum(s_t, "analysis", "rewrite")
        row["torch_pruning build+prune"] = _sum(t_t, "build", "prune")
        row["slimship trace+analysis+rewrite"] = _sum(s_t, "trace", "analysis", "rewrite")
        if not args.skip_end_to_end:
            row["slimship slim() end-to-end"] = timed(lambda: slimship.slim(model, x))[1]
        for key, value in row.items():
            runs.setdefault(key, []).append(value)

    with torch.no_grad():
        out_slim, out_tp = slim_model(x), tp_model(x)
    p_slim, p_tp = count_params(slim_model), count_params(tp_model)
    say(
        f"params: source {count_params(model):,}  slimship {p_slim:,}  torch_pruning {p_tp:,}  "
        f"({'same' if p_slim == p_tp else 'DIFFERENT'})"
    )
    d_tools, d_src = rel_diff(out_slim, out_tp), rel_diff(expected, out_slim)
    verdict = "equal" if d_tools <= 1e-4 else "NOT EQUAL"
    say(
        f"outputs: slimship vs torch_pruning max rel diff {d_tools:.2e} ({verdict} within 1e-4); "
        f"slimship vs source {d_src:.2e}"
    )

    wall = {k: statistics.median(v[0] for v in vs) for k, vs in runs.items()}
    cpu = {k: statistics.median(v[1] for v in vs) for k, vs in runs.items()}
    say()
    say(f"{'stage (seconds)':<34} {'wall p50':>9} {'cpu p50':>8}   wall per run")
    for key, values in runs.items():
        each = " ".join(f"{v[0]:.3f}" for v in values)
        say(f"{key:<34} {wall[key]:>9.3f} {cpu[key]:>8.3f}   {each}")
    say()
    base = "torch_pruning build+prune"
    for key in ("slimship analysis+rewrite", "slimship trace+analysis+rewrite", "slimship slim() end-to-end"):
        if key in wall:
            ratio_w, ratio_c = wall[key] / wall[base], cpu[key] / cpu[base]
            say(f"ratio {key} / {base}: wall {ratio_w:.2f}x, cpu {ratio_c:.2f}x")
    headline = wall["slimship analysis+rewrite"] / wall[base]
    verdict = "slimship no slower" if headline <= 1 else "slimship SLOWER"
    say(f"=> headline (analysis+rewrite vs build+prune, wall): {verdict}")

    if args.out:
        with open(args.out, "w") as f:
            f.write("```\n" + "\n".join(lines) + "\n```\n")

    if args.profile:
        traced = trace(model, (x,))
        gm = copy.deepcopy(traced.gm)
        profiler = cProfile.Profile()
        profiler.enable()
        analysis = _analyse(gm, True, True, set())
        rewrite(analysis.graph, analysis.plan)
        profiler.disable()
        profiler.dump_stats(args.profile)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
