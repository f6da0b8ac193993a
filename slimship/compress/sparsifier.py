"""Sparsifiers: compression methods as objects that any training loop drives.

    sp = slimship.compress.sparsifier("hesso", model, example_inputs, total_steps=len(loader) * epochs)
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        sp.after_backward()   # edits gradients (held zeros, centripetal terms); reads Taylor scores
        optimizer.step()
        sp.after_step()       # projections, shrinking, drop-out / drop-in, holding zeros and clusters

Works with any optimizer; with AMP call ``scaler.unscale_(optimizer)`` before ``after_backward()``; with
DistributedDataParallel pass the wrapped model (its ``.module`` is used). Under FSDP2 build the sparsifier
on the plain model, then ``fully_shard`` it: the sparsifier follows the parameters into their DTensor
shards, sums its group statistics over the shards and writes its zeros into each rank's chunk (building
on an already sharded model is refused, saying so). Decisions that depend on data
are averaged across ranks and random draws come from generators seeded alike on every rank, so all ranks
decide alike. ``state_dict()`` / ``load_state_dict()`` resume from the user's checkpoints.

One class per method in :data:`SPARSIFIERS`; ``compress(name, ...)`` drives the same classes.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from slimship.compress.checks import check_choice, check_fraction, check_int, is_int, is_number
from slimship.compress.device import device_of, mean_across_ranks, unwrap
from slimship.compress.groups import prunable_groups
from slimship.compress.registry import SHARDABLE, load_builtin_methods
from slimship.compress.shards import BUILD_ORDER, refuse_sharded, shard_key
from slimship.compress.training import Batch, Training, maybe_accuracy
from slimship.compress.views import GroupViews
from slimship.errors import CompressionError

#: name -> sparsifier class (filled by ``@register_sparsifier``)
SPARSIFIERS: dict[str, type[Sparsifier]] = {}

#: how groups are ranked for removal: by normalised norm, or salience (rank sum of norm and Taylor score)
CRITERIA = ("salience", "magnitude")


def register_sparsifier(name: str) -> Callable[[type[Sparsifier]], type[Sparsifier]]:
    """Class decorator: make `cls` available as ``sparsifier(name, ...)``."""

    def wrap(cls: type[Sparsifier]) -> type[Sparsifier]:
        if SPARSIFIERS.get(name, cls) is not cls:
            raise CompressionError(f"sparsifier {name!r} is registered twice")
        cls.name = name
        SPARSIFIERS[name] = cls
        SHARDABLE.add(name)  # `compress(name)` drives this class, which follows FSDP shards
        return cls

    return wrap


def sparsifier_options(name: str) -> dict[str, Any]:
    """The keyword options of sparsifier `name` (besides model, example_inputs, total_steps)."""
    options: dict[str, Any] = {}
    for klass in _lookup(name).__mro__:  # an __init__ taking **options passes them to its parent's
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        for p in params:
            if p.kind is inspect.Parameter.KEYWORD_ONLY:
                options.setdefault(p.name, p.default)
        if all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in params):
            break
    options.pop("total_steps", None)  # required, given apart
    return options


def check_sparsifier_options(name: str, options: dict[str, Any]) -> None:
    """Refuse options sparsifier `name` does not take, naming them and the allowed ones (a callback checks
    when it is made, not when training starts)."""
    unknown = sorted(set(options) - set(sparsifier_options(name)))
    if unknown:
        raise CompressionError(
            f"sparsifier {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"allowed options: {', '.join(sorted(sparsifier_options(name)))}"
        )


def _lookup(name: str) -> type[Sparsifier]:
    load_builtin_methods()
    if name not in SPARSIFIERS:
        raise CompressionError(
            f"no sparsifier {name!r}; allowed: {', '.join(sorted(SPARSIFIERS)) or '(none)'}"
        )
    return SPARSIFIERS[name]


def sparsifier(name: str, model: nn.Module, example_inputs: Any, *, total_steps: int, **options: Any):
    """The sparsifier of method `name` on `model` (plain or DDP-wrapped) for a run of `total_steps`."""
    cls = _lookup(name)
    allowed = sparsifier_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise CompressionError(
            f"sparsifier {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"allowed options: {', '.join(sorted(allowed))}"
        )
    return cls(model, example_inputs, total_steps=total_steps, **options)


def space_fractions(
    by_space: dict[str, list[int]], target: float, space_targets: dict[str, float] | None
) -> dict[str, float]:
    """Fraction of each space's groups to remove: `target`, or the space's entry in `space_targets`."""
    overrides = dict(space_targets or {})
    unknown = sorted(set(overrides) - set(by_space))
    if unknown:
        raise CompressionError(
            f"space_targets names {unknown}, which are not prunable spaces here; known: {sorted(by_space)}"
        )
    return {s: check_fraction(f"space_targets[{s!r}]", overrides.get(s, target)) for s in by_space}


def check_targets(target: Any, space_targets: dict[str, Any] | None) -> float:
    """`target` and each entry of `space_targets` must be fractions in [0, 1); returns `target`."""
    for space, value in (space_targets or {}).items():
        check_fraction(f"space_targets[{space!r}]", value)
    return check_fraction("target", target)


class TargetOptions:
    """Mixin of a method's options object holding ``target`` and ``space_targets``: ``check()`` applies
    the sparsifier's rules to them (a subclass adds its own rules after ``super().check()``)."""

    target: float
    space_targets: dict[str, float] | None

    def check(self) -> None:
        check_targets(self.target, self.space_targets)


#: the arguments every sparsifier takes: name -> (test, what it must be)
ARGUMENT_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": (lambda v: isinstance(v, nn.Module), "a torch.nn.Module (plain or DDP-wrapped)"),
    "total_steps": (lambda v: is_int(v) and v >= 1, "a positive int"),
    "target": (is_number, "a number in [0, 1)"),
    "space_targets": (
        lambda v: v is None or (isinstance(v, dict) and all(is_number(f) for f in v.values())),
        "None or a dict of space name -> number in [0, 1)",
    ),
    "spaces": (
        lambda v: v is None or (isinstance(v, list | tuple) and all(isinstance(x, str) for x in v)),
        "None or a list of space names",
    ),
    "seed": (is_int, "an int"),
}


def check_arguments(**values: Any) -> None:
    """CompressionError naming the first argument that breaks its rule in :data:`ARGUMENT_RULES`."""
    for name, value in values.items():
        test, what = ARGUMENT_RULES[name]
        if not test(value):
            raise CompressionError(f"sparsifier argument {name} must be {what}, got {value!r}")


def check_steps(**values: int | None) -> None:
    """Optional step counts: None (the default share of the run) or an int >= 0."""
    for name, value in values.items():
        if value is not None:
            check_int(name, value)


def check_parts(what: str, steps: int, parts: int, part_name: str) -> None:
    """A stage of `steps` steps cut into `parts` parts must give each part a step (no silent shortfall)."""
    if steps < parts:
        raise CompressionError(
            f"{what} ({steps} steps) must hold the {parts} {part_name}, one step each at least, or the run "
            f"falls short of its target; lengthen the stage (or the run) or lower {part_name}"
        )


def stage_steps(total: int, warmup: int | None, middle: int | None, what: str) -> tuple[int, int]:
    """(first, end) step of a method's middle stage: defaults 25% warm-up, 40% middle."""
    warmup = max(1, round(0.25 * total)) if warmup is None else warmup
    middle = max(1, round(0.4 * total)) if middle is None else middle
    if warmup < 0 or middle < 1 or warmup + middle > total:
        raise CompressionError(
            f"warmup={warmup} and {what}={middle} must fit in the run's {total} steps "
            f"(warmup >= 0, {what} >= 1)"
        )
    return warmup, warmup + middle


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """0-based rank of each value (ties by position)."""
    order = torch.argsort(values, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(order), device=values.device)
    return ranks


class Sparsifier:
    """Shared ground: prunable groups per space, per-space quotas, the held-zero mask, the step counter.

    Subclasses implement ``on_backward`` / ``on_step`` (called under ``torch.no_grad()``) and list their
    decision state in ``state_keys``. ``self.step`` counts completed optimizer steps.
    """

    name: ClassVar[str] = ""
    state_keys: ClassVar[tuple[str, ...]] = ()
    #: zero the consuming slices of held groups too (magnitude pruning's importance includes them)
    hold_consumers: ClassVar[bool] = False
    #: state keys holding this rank's chunks of parameters under FSDP (a rank loads only its own)
    local_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        *,
        total_steps: int,
        target: float = 0.5,
        space_targets: dict[str, float] | None = None,
        spaces: list[str] | None = None,
        seed: int = 0,
    ) -> None:
        check_arguments(
            model=model,
            total_steps=total_steps,
            target=target,
            space_targets=space_targets,
            spaces=spaces,
            seed=seed,
        )
        self.model = unwrap(model)
        refuse_sharded(self.model, f"sparsifier {self.name!r}")
        self.device = device_of(self.model)
        self.total_steps, self.seed = int(total_steps), int(seed)
        self.target = check_targets(target, space_targets)
        found, by_space = prunable_groups(self.model, example_inputs, spaces)
        self.fractions = fractions = space_fractions(by_space, self.target, space_targets)
        order = [i for idx in by_space.values() for i in idx]
        self.groups = [found.groups[i] for i in order]
        self.views = GroupViews(self.model, self.groups)
        members: dict[str, list[int]] = {}
        for local, g in enumerate(self.groups):
            members.setdefault(g.space, []).append(local)
        self.spaces = {s: torch.tensor(m, device=self.device) for s, m in members.items()}
        #: each group's space as a number (the order of `spaces`), and each space's first group
        self.space_of = torch.tensor(
            [k for k, m in enumerate(members.values()) for _ in m], dtype=torch.long, device=self.device
        )
        self.space_first = torch.tensor([m[0] for m in members.values()], device=self.device)
        self.quota = {s: min(round(fractions[s] * len(m)), len(m) - 1) for s, m in self.spaces.items()}
        self.step = 0
        self.zero = torch.zeros(len(self.groups), dtype=torch.bool, device=self.device)
        self.holding = False  # python-side: any zero decided yet (saves a device sync per step)
        self.backward_done = False  # python-side: after_backward() ran since the last after_step()
        self.warned_past_end = False

    # ---- the loop's two calls ----------------------------------------------------------------------
    def after_backward(self) -> None:
        """Call after ``loss.backward()`` (after ``scaler.unscale_`` with AMP), before the optimizer step.

        Once per optimizer step; past ``total_steps`` nothing is decided any more, zeros are only held.
        """
        if self.backward_done:
            self.wrong_order("after_backward() was called twice without after_step() in between")
        self.backward_done = True
        self.follow()
        with torch.no_grad():
            if self.step < self.total_steps:
                self.on_backward()
            else:
                self.warn_past_end()
            if self.holding:
                self.views.zero(self.zero, grads=True, consumers=self.hold_consumers)

    def after_step(self) -> None:
        """Call after ``optimizer.step()``, once per step."""
        if not self.backward_done:
            self.wrong_order("after_step() was called without after_backward() since the previous step")
        self.backward_done = False
        self.follow()
        with torch.no_grad():
            if self.step < self.total_steps:
                self.on_step()
            else:
                self.on_hold()
            if self.holding:
                self.views.zero(self.zero, consumers=self.hold_consumers)
        self.step += 1

    def follow(self) -> None:
        """Follow the model's parameters if they were replaced (sharded with fully_shard after building);
        only before the first optimizer step, when nothing is decided yet."""
        if self.views.refresh():
            if self.step > 0:
                raise CompressionError(
                    f"sparsifier {self.name!r}: the model's parameters were replaced at step {self.step} "
                    f"(sharded in the middle of the run?); shard before the first step: {BUILD_ORDER}"
                )
            self.on_rebind()

    def track(self, model: nn.Module) -> None:
        """Follow the parameters of `model` from now on: the same module by names (slimship's loop trains
        a sharded copy under strategy fsdp and hands the trained values back to the plain model)."""
        model = unwrap(model)
        if model is not self.views.model:
            self.model = self.views.model = model
            if self.views.refresh(relocate=True):
                self.on_rebind()

    def on_rebind(self) -> None:
        """Method hook after the parameters moved into shards: remake state held per parameter chunk."""

    def wrong_order(self, what: str) -> None:
        raise CompressionError(
            f"sparsifier {self.name!r} at step {self.step}: {what}; each step must call, in this order: "
            "loss.backward(); sp.after_backward(); optimizer.step(); sp.after_step()"
        )

    def warn_past_end(self) -> None:
        """One warning when the loop runs past ``total_steps`` (decisions are over, zeros stay held)."""
        if not self.warned_past_end:
            self.warned_past_end = True
            warnings.warn(
                f"sparsifier {self.name!r}: step {self.step + 1} is past total_steps={self.total_steps}; "
                "it decides nothing more and only holds its zeros. Pass the run's real number of "
                "optimizer steps as total_steps",
                RuntimeWarning,
                stacklevel=3,
            )

    def on_hold(self) -> None:
        """Method hook after an optimizer step past ``total_steps`` (zeros are held by the base class)."""

    def on_backward(self) -> None:
        """Method hook after backward (gradients present)."""

    def on_step(self) -> None:
        """Method hook after the optimizer step; ``self.step`` is the 0-based index of that step."""

    # ---- state ------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The settings that shape the decisions (a saved state only resumes a run with the same ones)."""
        return {"total_steps": self.total_steps, "fractions": dict(self.fractions), "seed": self.seed}

    def fingerprint(self) -> list[str]:
        """Each group as ``space:values`` (its space and number of values): tells one model from another."""
        sizes = self.views.sizes.cpu().tolist()
        return [f"{g.space}:{int(n)}" for g, n in zip(self.groups, sizes, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        """Decision state (tensors, numbers, lists): save it beside the model and optimizer."""
        state = {
            "method": self.name,
            "step": self.step,
            "zero": self.zero.clone(),
            "config": self.config(),
            "groups": self.fingerprint(),
        }
        for key in self.state_keys:
            value = getattr(self, key)
            state[key] = value.clone() if isinstance(value, torch.Tensor) else _copy(value)
        if self.local_keys and self.views.group is not None:
            state["shard"] = shard_key(self.views.group)
        return state

    def check_state(self, state: Any) -> None:
        """CompressionError naming what makes `state` unfit for this sparsifier (method, keys, model,
        settings)."""
        if not isinstance(state, dict):
            raise CompressionError(f"sparsifier state must be the dict of state_dict(), got {type(state)}")
        if state.get("method") != self.name:
            raise CompressionError(
                f"sparsifier state is for {state.get('method')!r}, not {self.name!r}; "
                "load the state saved by the same method"
            )
        missing = [k for k in ("step", "zero", "config", "groups", *self.state_keys) if k not in state]
        if missing:
            raise CompressionError(
                f"sparsifier state of {self.name!r} lacks {', '.join(map(repr, missing))}; load a state "
                "saved by this slimship version's state_dict()"
            )
        if not isinstance(state["config"], dict) or not isinstance(state["groups"], list):
            raise CompressionError(f"sparsifier state of {self.name!r} has a malformed 'config' or 'groups'")
        saved, here = state["groups"], self.fingerprint()
        if len(saved) != len(here):
            raise CompressionError(
                f"sparsifier state has {len(saved)} groups, this model {len(here)}: it was saved for "
                "another model (or other spaces); load it into the model it was saved with"
            )
        diff = next((i for i, (a, b) in enumerate(zip(saved, here, strict=True)) if a != b), None)
        if diff is not None:
            raise CompressionError(
                f"sparsifier state was saved for another model: group {diff} is {saved[diff]} there, "
                f"{here[diff]} here (space:values)"
            )
        ours = self.config()
        differ = sorted(k for k in set(ours) | set(state["config"]) if state["config"].get(k) != ours.get(k))
        if differ:
            what = "; ".join(f"{k}: saved {state['config'].get(k)!r}, here {ours.get(k)!r}" for k in differ)
            raise CompressionError(
                f"sparsifier state of {self.name!r} was saved with other settings ({what}); "
                "build the sparsifier with the same total_steps and options to resume"
            )
        saved_shard = state.get("shard")
        here_shard = shard_key(self.views.group) if self.local_keys else None
        if self.local_keys and saved_shard != here_shard:
            raise CompressionError(
                f"sparsifier state of {self.name!r} holds parameter chunks of shard {saved_shard} "
                f"([rank, ranks]; None: unsharded), this sparsifier's are {here_shard}: under FSDP every "
                "rank saves and loads its own sparsifier state (sp.state_dict() on each rank)"
            )
        zero, step = state["zero"], state["step"]
        if (
            not isinstance(zero, torch.Tensor)
            or zero.shape != self.zero.shape
            or not isinstance(step, int)
            or step < 0
        ):
            raise CompressionError(f"sparsifier state of {self.name!r} has a malformed 'step' or 'zero'")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (tensors move to the model's device); a state of
        another method, model or settings is refused."""
        self.follow()
        self.check_state(state)
        self.backward_done = False
        self.step = int(state["step"])
        self.zero = state["zero"].to(self.device).clone()
        self.holding = bool(self.zero.any())
        for key in self.state_keys:
            value = state[key]
            setattr(
                self,
                key,
                value.to(self.device).clone()
                if isinstance(value, torch.Tensor)
                else _move(value, self.device),
            )

    # ---- reports -----------------------------------------------------------------------------------
    def decisions(self) -> dict[str, Any]:
        """What the method decided so far, as plain lists (compared across ranks and runs)."""
        return {"zero": self.zero.nonzero().flatten().tolist()}

    def summary(self) -> dict[str, Any]:
        """Per space: groups exactly zero now, decided, that ``slim`` removes now, in total.

        ``group_sparsity`` is the fraction of groups exactly zero; ``removable`` the fraction ``slim``
        removes from the model as it is now (zero groups, and for C-SGD the merged-away cluster members).
        """
        self.follow()
        measured = self.views.is_zero().cpu()
        decided = self.zero.cpu()
        spaces = {
            s: {"zero": int(measured[m.cpu()].sum()), "decided": int(decided[m.cpu()].sum()), "total": len(m)}
            for s, m in self.spaces.items()
        }
        for space, removable in self.removable(spaces).items():
            spaces[space]["removable"] = removable
        total = sum(v["total"] for v in spaces.values())
        return {
            "method": self.name,
            "step": self.step,
            "group_sparsity": float(measured.float().mean()) if len(measured) else 0.0,
            "removable": sum(v["removable"] for v in spaces.values()) / total if total else 0.0,
            "spaces": spaces,
        }

    def removable(self, spaces: dict[str, dict[str, int]]) -> dict[str, int]:
        """Per space, the groups ``slim`` removes now: the zero ones (methods that merge add theirs)."""
        return {s: v["zero"] for s, v in spaces.items()}

    def per_space(self) -> dict[str, list[int]]:
        """space -> [groups exactly zero, groups]."""
        return {s: [v["zero"], v["total"]] for s, v in self.summary()["spaces"].items()}

    # ---- ranking, shared by the methods -------------------------------------------------------------
    def magnitude(self) -> torch.Tensor:
        """Norm of each group per value (comparable across layouts), averaged across ranks."""
        return mean_across_ranks(self.views.norms() / self.views.sizes.sqrt())

    def scores(self, criterion: str) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Removal scores: magnitude, or (magnitude, Taylor) for ``salience`` (lowest goes first)."""
        check_choice("criterion", criterion, CRITERIA)
        if criterion == "magnitude":
            return self.magnitude()
        return self.magnitude(), mean_across_ranks(self.views.taylor())

    def least(
        self, scores: torch.Tensor | tuple[torch.Tensor, ...], space: str, eligible: torch.Tensor, k: int
    ) -> torch.Tensor:
        """Indices of the `k` least important eligible groups of `space`, least first.

        With several scores the order is the sum of per-score ranks among the eligible groups.
        """
        members = self.spaces[space]
        ok = eligible[members]
        parts = scores if isinstance(scores, tuple) else (scores,)
        inf = torch.tensor(math.inf, dtype=parts[0].dtype, device=self.device)
        if len(parts) == 1:
            key = torch.where(ok, parts[0][members], inf)
        else:
            key = sum(_ranks(torch.where(ok, p[members], inf)) for p in parts).to(parts[0].dtype)
            key = torch.where(ok, key, inf)
        order = torch.argsort(key, stable=True)
        return members[order[: min(k, int(ok.sum()))]]

    def least_each(self, scores: torch.Tensor, eligible: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
        """Mask of the ``need[space]`` least scored eligible groups of every space (as :meth:`least` per
        space, in a few tensor ops for all spaces: no loop, no device sync). Spaces hold consecutive groups.
        """
        inf = torch.tensor(math.inf, dtype=scores.dtype, device=self.device)
        order = torch.argsort(torch.where(eligible, scores, inf), stable=True)
        # by space, then score, then index (index_select: indexing with [] is several times slower on CPU)
        order = order.index_select(0, torch.argsort(self.space_of.index_select(0, order), stable=True))
        space = self.space_of.index_select(0, order)
        place = torch.arange(len(order), device=self.device) - self.space_first.index_select(0, space)
        keep = (place < need.index_select(0, space)) & eligible.index_select(0, order)
        return torch.zeros_like(eligible).index_copy_(0, order, keep)


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value.clone() if isinstance(value, torch.Tensor) else value


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, list):
        return [_move(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value.to(device).clone() if isinstance(value, torch.Tensor) else value


# ---- slimship's own loop drives the same objects ------------------------------------------------------
def steps_per_epoch(train: Iterable[Batch] | None) -> int:
    if train is None:
        raise CompressionError("this method trains: pass training batches (train=...)")
    try:
        return len(train)  # type: ignore[arg-type]
    except TypeError:
        return sum(1 for _ in train)


def train_with(
    sp: Sparsifier,
    model: nn.Module,
    train: Iterable[Batch],
    test: Iterable[Batch] | None,
    training: Training,
    epoch_record: Callable[[], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """`training.run` with `sp` as its hooks; the sparsifier's state rides in the training checkpoint."""
    state: dict[str, Any] = {}

    def grad_hook(m: nn.Module, epoch: int, step: int) -> None:
        sp.track(m)  # the sharded copy under strategy fsdp
        if sp.step != step:  # resumed from a checkpoint: the loop restored `state` in place
            sp.load_state_dict(state["sparsifier"])
        sp.after_backward()

    def epoch_hook(m: nn.Module, epoch: int, step: int) -> dict[str, Any]:
        sp.track(m)
        state["sparsifier"] = sp.state_dict()  # saved with the checkpoint right after this hook
        record = (
            epoch_record() if epoch_record is not None else {"group_sparsity": sp.summary()["group_sparsity"]}
        )
        acc = maybe_accuracy(m, test)
        if acc is not None:
            record["test_accuracy"] = acc
        return record

    history = training.run(
        model,
        train,
        desc=sp.name,
        grad_hook=grad_hook,
        step_hook=lambda m, e, s: sp.after_step(),
        epoch_hook=epoch_hook,
        state=state,
    )
    sp.track(model)  # back to the plain model, which holds the trained values
    return history
