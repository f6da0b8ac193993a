"""LoRITa: low-rank induced training, then SVD truncation into pairs of thin layers.

Training (``compress("lorita", ...)``): every Linear and every ungrouped convolution (its weight seen as
an ``out x (in * k * k)`` matrix) is over-parametrised as a product of `depth` factors
(``torch.nn.utils.parametrize``) and trained with weight decay, which drives the product to low rank.
After training the factors are multiplied back, leaving a model of the original architecture.

Slimming (``factorize``): the SVD of each weight is truncated at a rank set by `rank_ratio` or by an
`energy` threshold, and the layer becomes two thin ones (``Linear(in, r)`` then ``Linear(r, out)``, or
``conv(in, r, k)`` then a 1x1 ``conv(r, out)``) only where that lowers its FLOPs. Each replaced layer is
checked numerically: on the inputs it sees, its output error must not exceed what the truncation
allows (``sigma_{r+1} * ||input||``, the spectral bound of the dropped part). With
``finetune_epochs`` > 0 the thin model is then trained for a few epochs (Adam, no weight decay) to recover
the truncation loss; it stays a plain model of thin layers, so its export is exact to what was evaluated.

In your own loop: ``lowrank = parametrize_low_rank(model, depth=3)`` before building the optimizer (and
before wrapping in DDP), train with weight decay, then ``lowrank.factorize(example_inputs, energy=...)``.
``compress("lorita", ...)`` is the same parametrisation and collapse around ``train_loop``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from slimship.compress.adc.budget import layer_flops
from slimship.compress.checks import check_int, check_module, check_number
from slimship.compress.device import score_dtype, unwrap
from slimship.compress.groups import run_with_hooks
from slimship.compress.registry import CompressResult, register
from slimship.compress.training import Batch, LoopOptions, maybe_accuracy, train_loop, working_copy
from slimship.errors import CompressionError, VerificationError
from slimship.slimming.api import count_flops, count_params, verify_outputs
from slimship.slimming.trace import as_input_tuple

log = logging.getLogger(__name__)


def _matrix_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear layers and ungrouped, non-transposed convolutions (the layers LoRITa works on)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) or (
            isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and m.groups == 1
        ):
            out.append((name, m))
    return out


class ProductOfFactors(nn.Module):
    """Parametrization ``W = A_N ... A_2 A_1`` (reshaped to the weight's shape), initialised from W's SVD."""

    def __init__(self, shape: torch.Size, depth: int) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.depth = depth

    def forward(self, *factors: torch.Tensor) -> torch.Tensor:
        w = factors[0]
        for f in factors[1:]:
            w = f @ w
        return w.reshape(self.shape)

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        matrix = weight.reshape(weight.shape[0], -1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        root = s ** (1.0 / self.depth)
        first = root[:, None] * vh  # (h, in)
        last = u * root[None, :]  # (out, h)
        middle = [torch.diag(root) for _ in range(self.depth - 2)]
        return (first, *middle, last)


def overparametrize(model: nn.Module, depth: int) -> list[str]:
    """Make every matrix layer's weight a product of `depth` factors, in place; return the layer names."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
        raise CompressionError(f"option 'depth' must be an integer >= 2 (factors per weight), got {depth!r}")
    names = []
    for name, m in _matrix_layers(model):
        if parametrize.is_parametrized(m, "weight"):
            raise CompressionError(
                f"layer {name!r} is already parametrised: apply the LoRITa parametrisation once per model"
            )
        parametrize.register_parametrization(m, "weight", ProductOfFactors(m.weight.shape, depth))
        names.append(name)
    return names


def collapse(model: nn.Module) -> nn.Module:
    """Multiply the factors back into plain weights, in place (a DDP wrapper is unwrapped).

    Copies of `model` (``copy.deepcopy``) stay parametrised and working: torch's removal deletes the
    weight property from the module's class, which a deep copy shares, so each module first gets a class
    of its own.
    """
    for _, m in unwrap(model).named_modules():
        if parametrize.is_parametrized(m, "weight"):
            shared = type(m)  # torch's injected ``Parametrized<Layer>`` class
            m.__class__ = type(shared.__name__, shared.__bases__, dict(vars(shared)))
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model


@dataclass
class LowRankParametrization:
    """What :func:`parametrize_low_rank` did to a model: the parametrised layers and the factors each.

    :meth:`factorize` leaves the model parametrised (it works on a copy), so training can go on and
    factorize again; :meth:`collapse` is destructive by design: it ends the LoRITa run in place.
    """

    model: nn.Module
    layers: list[str]
    depth: int

    def collapse(self) -> nn.Module:
        """Multiply the factors back into plain weights, in place: the model of the original architecture.

        Destructive: the factors your optimizer holds no longer drive the model afterwards. Use it to end
        the run; :meth:`factorize` does not need it.
        """
        return collapse(self.model)

    def effective_ranks(self, energy: float = 0.98) -> dict[str, int]:
        """Per parametrised layer, the rank keeping `energy` of its weight's squared singular values."""
        _check_rank_options(None, energy)
        modules = dict(self.model.named_modules())
        return {n: _rank_for(_singular_values(modules[n]), None, energy) for n in self.layers}

    def factorize(self, example_inputs: Any, **options: Any) -> FactorizeResult:
        """:func:`factorize` a collapsed copy into thin layers (same options); the model itself stays
        parametrised, in its train/eval mode, and trainable by the optimizer that holds its factors."""
        return factorize(self.model, example_inputs, **options)


def parametrize_low_rank(model: nn.Module, *, depth: int = 3) -> LowRankParametrization:
    """LoRITa's parametrisation for your own loop: call it before building the optimizer and before DDP.

        lowrank = parametrize_low_rank(model, depth=3)          # 1. before the optimizer and DDP(model)
        optimizer = torch.optim.AdamW(model.parameters(), weight_decay=1e-4)
        ...your loop, unchanged...                              # 2. weight decay drives the rank down
        result = lowrank.factorize(example_inputs, energy=0.98)  # 3. after training: thin layers

    Every Linear and ungrouped convolution weight becomes a product of `depth` factors (in place, on the
    weight's device and dtype; the model computes the same function). A DistributedDataParallel wrapper
    is refused: DDP records the parameters when it is built, so parametrise the plain model first.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise CompressionError(
            "parametrize_low_rank got a DistributedDataParallel model: parametrise the plain model first, "
            "then wrap it in DDP (DDP keeps the parameters it saw when built)"
        )
    check_module("parametrize_low_rank model", model)
    model = unwrap(model)
    names = overparametrize(model, depth)
    if not names:
        raise CompressionError("lorita: the model has no Linear or ungrouped convolution layer to factorise")
    return LowRankParametrization(model=model, layers=names, depth=depth)


@dataclass(frozen=True)
class LoritaOptions:
    """The options of :func:`lorita` (see its documentation); ``lorita(..., options=LoritaOptions(...))``."""

    depth: int = 3
    epochs: int = 20
    lr: float = 2e-3
    weight_decay: float = 1e-4
    rank_ratio: float | None = None
    energy: float | None = 0.98
    min_saving: float = 0.0
    finetune_epochs: int = 0
    finetune_lr: float = 1e-3
    checkpoint: str | None = None
    seed: int = 0

    def check(self) -> None:
        """The rules of the options ``factorize`` is handed (checked before the training, not after)."""
        _check_rank_options(self.rank_ratio, self.energy)
        _check_finetune(self.finetune_epochs, self.finetune_lr, None, need_train=False)


@register("lorita", options=LoritaOptions)
def lorita(
    model: nn.Module,
    example_inputs: Any,
    train: Iterable[Batch] | None,
    test: Iterable[Batch] | None = None,
    *,
    options: LoritaOptions,
) -> CompressResult:
    """Train with each weight over-parametrised as `depth` factors (Adam + weight decay), then collapse.

    Exactly :func:`parametrize_low_rank`, ``train_loop`` and :meth:`LowRankParametrization.collapse`.
    `rank_ratio` / `energy` / `min_saving` / `finetune_epochs` / `finetune_lr` are not used here: they are
    handed to ``factorize`` through ``info["factorize"]`` (the pipeline's slimming step for this method,
    ``info["slim_step"]``); a fine-tune there also needs the training batches.
    """
    if train is None:
        raise CompressionError("lorita needs training data (train batches)")
    model = working_copy(model)
    lowrank = parametrize_low_rank(model, depth=options.depth)
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    history = train_loop(
        model,
        train,
        LoopOptions(epochs=options.epochs, seed=options.seed, checkpoint=options.checkpoint),
        optimizer=optimizer,
        desc=f"lorita (depth {options.depth})",
    )
    lowrank.collapse()
    model.eval()
    info = {
        "slim_step": "factorize",
        "factorize": {
            "rank_ratio": options.rank_ratio,
            "energy": options.energy,
            "min_saving": options.min_saving,
            "finetune_epochs": options.finetune_epochs,
            "finetune_lr": options.finetune_lr,
        },
        "depth": options.depth,
        "layers": lowrank.layers,
        "effective_rank": lowrank.effective_ranks(options.energy or 0.98),
        "test_accuracy": maybe_accuracy(model, test),
    }
    return CompressResult(model=model, method="lorita", history=history, info=info)


# ---- factorize ------------------------------------------------------------------------------------
@dataclass
class LayerFactor:
    name: str
    kind: str  # linear | conv
    shape: list[int]
    full_rank: int
    rank: int
    replaced: bool
    flops_before: float
    flops_after: float
    rel_truncation_error: float  # ||W - W_r||_F / ||W||_F
    rel_output_error: float  # measured on the layer's own inputs
    output_error_bound: float  # sigma_{r+1} * ||input||_F (relative to ||output||_F)


@dataclass
class FactorizeResult:
    model: nn.Module
    layers: list[LayerFactor]
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    max_rel_output_diff: float  # whole model, slim vs collapsed, on the example inputs (before a fine-tune)
    options: dict[str, Any] = field(default_factory=dict)
    finetune_history: list[dict[str, Any]] = field(default_factory=list)  # one record per fine-tune epoch

    @property
    def flops_ratio(self) -> float:
        """Dense FLOPs / thin FLOPs (x fewer FLOPs, > 1 is a saving), as ``slim(...).flops_ratio``."""
        return self.flops_before / max(self.flops_after, 1)


def _check_rank_options(rank_ratio: float | None, energy: float | None) -> None:
    for name, value in (("rank_ratio", rank_ratio), ("energy", energy)):
        if value is not None:
            check_number(f"option {name!r}", value, 0.0, 1.0, low_open=True, high_open=False)


def _check_finetune(
    epochs: int, lr: float, train: Iterable[Batch] | None, *, need_train: bool = True
) -> None:
    check_int("option 'finetune_epochs'", epochs, 0)
    check_number("option 'finetune_lr'", lr, 0.0, math.inf, low_open=True, high_open=True)
    if need_train and epochs > 0 and train is None:
        raise CompressionError(
            f"finetune_epochs={epochs} needs training batches (pass train=...), or set finetune_epochs=0"
        )


def wide(t: torch.Tensor) -> torch.Tensor:
    """`t` in the widest float its device has (float64; float32 on MPS), for norms and SVDs."""
    return t.to(score_dtype(t.device))


def _singular_values(m: nn.Module) -> torch.Tensor:
    w = m.weight.detach()
    return torch.linalg.svdvals(wide(w.reshape(w.shape[0], -1)))


def _rank_for(s: torch.Tensor, rank_ratio: float | None, energy: float | None) -> int:
    full = len(s)
    if rank_ratio is not None:
        return max(1, min(full, math.ceil(rank_ratio * full)))
    power = wide(s) ** 2
    total = float(power.sum())
    if total == 0:
        return 1
    kept = torch.cumsum(power, 0) / total
    return max(1, min(full, int((kept < energy - 1e-12).sum()) + 1))


def _pair(m: nn.Module, rank: int, u, s, vh) -> nn.Sequential:
    """Two thin layers for `m` at `rank`, on `m`'s device and dtype."""
    where = {"device": m.weight.device, "dtype": m.weight.dtype}
    root = s[:rank].sqrt()
    a = (root[:, None] * vh[:rank]).to(**where)
    b = (u[:, :rank] * root[None, :]).to(**where)
    if isinstance(m, nn.Linear):
        first, second = (
            nn.Linear(m.in_features, rank, bias=False, **where),
            nn.Linear(rank, m.out_features, bias=m.bias is not None, **where),
        )
        first.weight.data.copy_(a)
        second.weight.data.copy_(b)
    else:
        conv = type(m)
        first = conv(
            m.in_channels,
            rank,
            m.kernel_size,
            m.stride,
            m.padding,
            m.dilation,
            bias=False,
            padding_mode=m.padding_mode,
            **where,
        )
        second = conv(rank, m.out_channels, 1, bias=m.bias is not None, **where)
        first.weight.data.copy_(a.reshape(rank, *m.weight.shape[1:]))
        second.weight.data.copy_(b.reshape(m.out_channels, rank, *([1] * (m.weight.dim() - 2))))
    if m.bias is not None:
        second.bias.data.copy_(m.bias.detach())
    return nn.Sequential(first, second)


def _layer_inputs(model: nn.Module, names: list[str], inputs: tuple[Any, ...]) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def hook(name: str):
        def fn(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            seen.setdefault(name, args[0].detach())

        return fn

    run_with_hooks(model, inputs, {modules[n]: hook(n) for n in names})
    return seen


def _input_norm(m: nn.Module, x: torch.Tensor) -> float:
    """Frobenius norm of the matrix the weight multiplies (the unfolded input for a 2-D convolution)."""
    if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str):
        x = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)
        return float(wide(x).norm())
    if isinstance(m, nn.Linear):
        return float(wide(x).norm())
    # other convolutions: each input value is read at most prod(kernel) times
    return float(wide(x).norm()) * math.sqrt(math.prod(m.kernel_size))


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def factorize(
    model: nn.Module,
    example_inputs: Any,
    rank_ratio: float | None = None,
    energy: float | None = None,
    min_saving: float = 0.0,
    *,
    train: Iterable[Batch] | None = None,
    finetune_epochs: int = 0,
    finetune_lr: float = 1e-3,
    seed: int = 0,
) -> FactorizeResult:
    """Replace each matrix layer by two thin ones at the truncated rank wherever that lowers its FLOPs.

    Exactly one of `rank_ratio` (fraction of the full rank) or `energy` (fraction of sum sigma^2 kept)
    sets the rank. With `min_saving` > 0 a layer is replaced only if that removes at least that fraction
    of its FLOPs (a marginal saving is not worth the truncation error). Raises VerificationError if a
    replaced layer's output error on its inputs exceeds the truncation bound.

    `finetune_epochs` > 0 then trains the thin model on `train` (Adam at `finetune_lr`, no weight decay,
    seeded): the per-layer errors and `max_rel_output_diff` describe the truncation before that fine-tune,
    ``finetune_history`` the fine-tune itself.
    """
    check_module("factorize model", model)
    if (rank_ratio is None) == (energy is None):
        raise CompressionError("factorize: pass exactly one of rank_ratio or energy")
    _check_rank_options(rank_ratio, energy)
    check_number("factorize: min_saving", min_saving, 0.0, 1.0, low_open=False, high_open=True)
    _check_finetune(finetune_epochs, finetune_lr, train)
    inputs = as_input_tuple(example_inputs)
    source = copy.deepcopy(unwrap(model)).eval()
    collapse(source)
    slim_model = copy.deepcopy(source)
    layers = _matrix_layers(source)
    flops = layer_flops(source, inputs)
    xs = _layer_inputs(source, [n for n, _ in layers], inputs)
    reports = []
    for name, m in layers:
        if name not in xs:
            continue
        matrix = wide(m.weight.detach().reshape(m.weight.shape[0], -1))
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        full = len(s)
        rank = _rank_for(s, rank_ratio, energy)
        out_f, in_f = matrix.shape
        before = flops.get(name, 0.0)
        after = before * rank * (in_f + out_f) / (in_f * out_f)
        replaced = after < before * (1 - min_saving) and rank < full
        total = float((s**2).sum())
        trunc = math.sqrt(float((s[rank:] ** 2).sum()) / total) if total > 0 else 0.0
        rel_err = bound = 0.0
        if replaced:
            pair = _pair(m, rank, u, s, vh).eval()
            with torch.no_grad():
                y_ref, y_new = wide(m(xs[name])), wide(pair(xs[name]))
            ref_norm = max(float(y_ref.norm()), 1e-12)
            err = float((y_new - y_ref).norm())
            sigma_next = float(s[rank]) if rank < full else 0.0
            allowed = sigma_next * _input_norm(m, xs[name])
            if err > allowed * (1 + 1e-3) + 1e-5 * ref_norm:
                raise VerificationError(
                    f"factorize: layer {name!r} at rank {rank}/{full} has output error {err:.4g}, more than "
                    f"its truncation allows ({allowed:.4g}); please report this model"
                )
            rel_err, bound = err / ref_norm, allowed / ref_norm
            _set_module(slim_model, name, pair)
        else:
            after = before
        kind = "linear" if isinstance(m, nn.Linear) else "conv"
        reports.append(
            LayerFactor(
                name,
                kind,
                list(m.weight.shape),
                full,
                rank if replaced else full,
                replaced,
                before,
                after,
                trunc if replaced else 0.0,
                rel_err,
                bound,
            )
        )
    slim_model.eval()
    check = verify_outputs(source, slim_model, inputs, rtol=float("inf"), n_random=0, what="factorized model")
    history = []
    if finetune_epochs > 0 and any(r.replaced for r in reports):
        history = train_loop(
            slim_model,
            train,
            LoopOptions(epochs=finetune_epochs, seed=seed),
            optimizer=torch.optim.Adam(slim_model.parameters(), lr=finetune_lr),
            desc="lorita thin-model fine-tune",
        )
        slim_model.eval()
    return FactorizeResult(
        model=slim_model,
        layers=reports,
        flops_before=count_flops(source, inputs),
        flops_after=count_flops(slim_model, inputs),
        params_before=count_params(source),
        params_after=count_params(slim_model),
        max_rel_output_diff=check.max_rel_diff,
        options={
            "rank_ratio": rank_ratio,
            "energy": energy,
            "min_saving": min_saving,
            "finetune_epochs": finetune_epochs,
            "finetune_lr": finetune_lr,
        },
        finetune_history=history,
    )
