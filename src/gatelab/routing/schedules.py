"""Values that change over training steps: temperatures, k, capacity factors.

A schedule is a small object whose value is a pure function of the optimizer step
(``schedule(step) -> float``), built from a plain dict so a TOML recipe can name it::

    tau = { kind = "linear", start = 2.0, end = 0.5, steps = 5000 }
    capacity_factor = { kind = "step", values = [2.0, 1.25], boundaries = [1000] }

Kinds (``SCHEDULES``): ``constant`` (value), ``linear`` and ``exponential`` (start, end,
steps, begin), ``step`` (values, boundaries; one boundary is a switch).

How the trainer advances them: :func:`step_schedules` ``(model, step)`` calls
``module.set_step(step)`` on every module that defines it (routers with their own
schedules, such as ``dense_to_sparse``) and sets every attribute attached with
:func:`attach_schedule` (``MoE.capacity_factor``, a router's ``top_k``). ``Trainer`` calls it
before each step with the number of steps already taken. Since a value depends on nothing but
that step, which the checkpoint stores, a resumed run sees the values an uninterrupted one
would: no schedule state needs saving.

Recipes name them in two places: a router's own arguments (``router_kwargs = { tau = {...} }``
for ``dense_to_sparse``) and ``LMConfig.schedules`` (``capacity_factor`` of every MoE layer,
``top_k`` of every router; see :func:`attach_moe_schedules`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from ..registry import Registry

SCHEDULES: Registry[type[Schedule]] = Registry("schedule")

# Attribute name under which attach_schedule keeps a module's schedules (a plain dict).
_ATTACHED = "_gatelab_schedules"


class Schedule:
    """Base class: ``schedule(step)`` is the value for 0-based optimizer step ``step``."""

    kind: str = ""

    def value(self, step: int) -> float:
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"a schedule's step must be an int >= 0, got {step!r}")
        return float(self.value(step))

    def to_dict(self) -> dict[str, Any]:
        """The plain dict :func:`build_schedule` turns back into this schedule."""
        return {"kind": self.kind, **self._fields()}

    def _fields(self) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._fields().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.to_dict() == other.to_dict()

    __hash__ = None  # equal by value, like the dict it comes from


@SCHEDULES.register("constant")
class Constant(Schedule):
    """The same value at every step."""

    kind = "constant"

    def __init__(self, value: float):
        self.val = _number("value", value)

    def value(self, step: int) -> float:
        return self.val

    def _fields(self) -> dict[str, Any]:
        return {"value": self.val}


class _Ramp(Schedule):
    """From ``start`` at step ``begin`` to ``end`` at step ``begin + steps``, held on both
    sides; subclasses choose the path between."""

    def __init__(self, start: float, end: float, steps: int, begin: int = 0):
        self.start, self.end = _number("start", start), _number("end", end)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{self.kind} schedule: steps must be an int >= 1, got {steps!r}")
        if isinstance(begin, bool) or not isinstance(begin, int) or begin < 0:
            raise ValueError(f"{self.kind} schedule: begin must be an int >= 0, got {begin!r}")
        self.steps, self.begin = steps, begin

    def progress(self, step: int) -> float:
        return min(1.0, max(0.0, (step - self.begin) / self.steps))

    def _fields(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "steps": self.steps, "begin": self.begin}


@SCHEDULES.register("linear")
class Linear(_Ramp):
    """A straight line: EvoMoE's "Linear" temperature decay,
    tau_t = max(tau_max - t (tau_max - tau_min) / D, tau_min), with start = tau_max,
    end = tau_min, steps = D."""

    kind = "linear"

    def value(self, step: int) -> float:
        return self.start + (self.end - self.start) * self.progress(step)


@SCHEDULES.register("exponential")
class Exponential(_Ramp):
    """A geometric path: EvoMoE's "Exp" decay, tau_t = max(tau_max exp(t ln(tau_min /
    tau_max) / D), tau_min). Start and end must be > 0."""

    kind = "exponential"

    def __init__(self, start: float, end: float, steps: int, begin: int = 0):
        super().__init__(start, end, steps, begin)
        if not (self.start > 0 and self.end > 0):
            raise ValueError(
                f"exponential schedule: start and end must be > 0, got {self.start}, "
                f"{self.end}; use kind = 'linear' to reach 0"
            )

    def value(self, step: int) -> float:
        return self.start * (self.end / self.start) ** self.progress(step)


@SCHEDULES.register("step")
class Step(Schedule):
    """Piecewise constant: ``values[i]`` from step ``boundaries[i - 1]`` on (``values[0]``
    before the first boundary). One boundary is a switch, e.g. hard routing from step N."""

    kind = "step"

    def __init__(self, values: Sequence[float], boundaries: Sequence[int]):
        values, boundaries = list(values), list(boundaries)
        if len(values) != len(boundaries) + 1:
            raise ValueError(
                f"step schedule: needs one more value than boundaries, got {len(values)} "
                f"values and {len(boundaries)} boundaries"
            )
        for b in boundaries:
            if isinstance(b, bool) or not isinstance(b, int) or b < 0:
                raise ValueError(f"step schedule: boundaries must be ints >= 0, got {b!r}")
        if boundaries != sorted(set(boundaries)):
            raise ValueError(f"step schedule: boundaries must increase, got {boundaries}")
        self.values = [_number("values", v) for v in values]
        self.boundaries = boundaries

    def value(self, step: int) -> float:
        return self.values[bisect.bisect_right(self.boundaries, step)]

    def _fields(self) -> dict[str, Any]:
        return {"values": list(self.values), "boundaries": list(self.boundaries)}


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"schedule {name} must be a finite number, got {value!r}")
    return float(value)


def build_schedule(spec: float | int | Mapping[str, Any] | Schedule) -> Schedule:
    """A Schedule from a number (constant), a dict with ``kind`` (a recipe table) or a
    Schedule (returned as is)."""
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        return Constant(spec)
    if not isinstance(spec, Mapping):
        raise TypeError(
            f"a schedule is a number, a dict with 'kind' or a Schedule; got {type(spec).__name__}"
        )
    fields = dict(spec)
    kind = fields.pop("kind", None)
    if kind is None:
        raise ValueError(f"a schedule dict needs 'kind' (one of {', '.join(SCHEDULES.names())})")
    cls = SCHEDULES.get(kind)
    try:
        return cls(**fields)
    except TypeError as error:
        raise ValueError(f"{kind} schedule: {error}") from None


def attach_schedule(
    module: nn.Module,
    attribute: str,
    schedule: float | Mapping[str, Any] | Schedule,
    cast: Callable[[float], Any] = float,
) -> Schedule:
    """Let :func:`step_schedules` set ``module.<attribute> = cast(schedule(step))``.

    For example ``attach_schedule(moe, "capacity_factor", {...})`` or
    ``attach_schedule(moe.router, "top_k", {...}, cast=round)``. The attribute must already
    exist (a typo fails here, not silently later). Schedules are not saved in checkpoints:
    attach them when the model is built, as the recipe does, and resume reproduces them.
    """
    if not hasattr(module, attribute):
        raise AttributeError(f"{type(module).__name__} has no attribute {attribute!r} to schedule")
    built = build_schedule(schedule)
    attached = module.__dict__.setdefault(_ATTACHED, {})
    attached[attribute] = (built, cast)
    setattr(module, attribute, cast(built(0)))
    return built


def attached_schedules(module: nn.Module) -> dict[str, Schedule]:
    """The schedules attached to ``module`` by attribute name."""
    return {name: s for name, (s, _) in module.__dict__.get(_ATTACHED, {}).items()}


def schedule_values(schedule: Schedule) -> list[float]:
    """The values a built-in schedule takes at its corners (its extremes lie among them)."""
    if isinstance(schedule, Constant):
        return [schedule.val]
    if isinstance(schedule, _Ramp):
        return [schedule.start, schedule.end]
    if isinstance(schedule, Step):
        return list(schedule.values)
    return [schedule(0), schedule(2**62)]


# The MoE attributes a model config may schedule: name -> (where it lives, cast).
MOE_SCHEDULES = {"capacity_factor": ("layer", float), "top_k": ("router", round)}


def check_moe_schedules(specs: Mapping[str, Any], num_experts: int) -> dict[str, Schedule]:
    """Build and check an MoE config's ``schedules`` table (keys in ``MOE_SCHEDULES``):
    capacity factors must stay > 0, ``top_k`` whole numbers in 1..num_experts."""
    built = {}
    for name, spec in specs.items():
        if name not in MOE_SCHEDULES:
            raise ValueError(
                f"cannot schedule {name!r}; schedulable: {', '.join(sorted(MOE_SCHEDULES))}"
            )
        schedule = built[name] = build_schedule(spec)
        values = schedule_values(schedule)
        if name == "capacity_factor" and not all(v > 0 for v in values):
            raise ValueError(f"a capacity_factor schedule must stay > 0, got {schedule!r}")
        if name == "top_k" and not all(v == int(v) and 1 <= v <= num_experts for v in values):
            raise ValueError(
                f"a top_k schedule must take whole values in 1..num_experts={num_experts} "
                f"(a linear one rounds between them), got {schedule!r}"
            )
    return built


def attach_moe_schedules(moe: nn.Module, specs: Mapping[str, Any]) -> None:
    """Attach a config's ``schedules`` to one MoE layer (``top_k`` goes to its router)."""
    for name, schedule in check_moe_schedules(specs, moe.num_experts).items():
        where, cast = MOE_SCHEDULES[name]
        attach_schedule(moe.router if where == "router" else moe, name, schedule, cast)


def step_schedules(model: nn.Module, step: int) -> None:
    """Advance every schedule in ``model`` to optimizer step ``step`` (steps already taken)."""
    for module in model.modules():
        set_step = getattr(module, "set_step", None)
        if callable(set_step):
            set_step(step)
        for attribute, (schedule, cast) in module.__dict__.get(_ATTACHED, {}).items():
            setattr(module, attribute, cast(schedule(step)))


__all__ = [
    "SCHEDULES",
    "Constant",
    "Exponential",
    "Linear",
    "Schedule",
    "Step",
    "MOE_SCHEDULES",
    "attach_moe_schedules",
    "attach_schedule",
    "attached_schedules",
    "build_schedule",
    "check_moe_schedules",
    "schedule_values",
    "step_schedules",
]
