"""The shared logic of model configs: plain-typed dataclasses that map one-to-one onto TOML.

A model config is a frozen dataclass deriving from :class:`Config`. Its fields hold only
what TOML can write (int, float, str, bool, lists and string-keyed tables of those), so a
recipe's ``[model]`` table is ``Config.from_dict(table)`` and ``to_dict()`` writes it back.

- ``from_dict`` rejects unknown keys, naming the nearest valid one (difflib), and missing
  keys take their defaults.
- Every value is checked against its field's annotation at construction (``from_dict``,
  the constructor and ``replace`` alike); an int is accepted where a float is expected and
  stored as a float, a tuple where a list is expected and stored as a list.
- TOML has no null: a field that may be ``None`` must default to ``None``, and ``to_dict``
  leaves ``None`` values out, so a missing key reads back as ``None``.
- Subclasses add cross-field checks in ``validate()``, raising :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A config value or key a user can fix; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of the model configs: type checks, ``from_dict``, ``to_dict``, ``replace``."""

    def __post_init__(self) -> None:
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):
            value = check_value(getattr(self, f.name), hints[f.name], self._key(f.name))
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Cross-field checks of a subclass; raise :class:`ConfigError` naming the key."""

    @classmethod
    def _key(cls, name: str) -> str:
        return f"{cls.__name__}.{name}"

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Build from a TOML table; unknown keys and wrong types raise :class:`ConfigError`."""
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{cls.__name__} must be built from a table (dict), got {type(data).__name__}"
            )
        valid = cls.keys()
        for key in data:
            if key not in valid:
                raise ConfigError(unknown_key_message(key, valid, cls.__name__))
        try:
            return cls(**data)
        except TypeError as error:  # a required field without default is missing
            raise ConfigError(f"{cls.__name__}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain values (lists and dicts copied; ``None`` left out)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = _plain_copy(value)
        return out

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied and checked like ``from_dict``."""
        valid = self.keys()
        for key in changes:
            if key not in valid:
                raise ConfigError(unknown_key_message(key, valid, type(self).__name__))
        return dataclasses.replace(self, **changes)


def unknown_key_message(key: object, valid: list[str], where: str) -> str:
    """'unknown key ... did you mean ...?' with the nearest valid key, or the valid keys."""
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys are: {', '.join(valid)}"
    return f"unknown key {key!r} in {where}; {hint}"


def check_value(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp`` (and normalised), or ConfigError."""
    ok, out = _match(value, tp)
    if not ok:
        raise ConfigError(f"{key}: expected {type_name(tp)}, got {_describe(value)}")
    return out


def _match(value: Any, tp: Any) -> tuple[bool, Any]:
    if tp is Any:
        return _is_plain(value), value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        for arm in args:
            ok, out = _match(value, arm)
            if ok:
                return True, out
        return False, None
    if origin is Literal:
        return value in args and type(value) in {type(a) for a in args}, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if tp is str:
        return isinstance(value, str), value
    if origin is list:
        if not isinstance(value, list | tuple):
            return False, None
        (item,) = args or (Any,)
        out = []
        for v in value:
            ok, checked = _match(v, item)
            if not ok:
                return False, None
            out.append(checked)
        return True, out
    if origin is dict:
        if not isinstance(value, Mapping):
            return False, None
        key_tp, item = args or (str, Any)
        out = {}
        for k, v in value.items():
            ok_k, _ = _match(k, key_tp)
            ok_v, checked = _match(v, item)
            if not (ok_k and ok_v):
                return False, None
            out[k] = checked
        return True, out
    raise TypeError(f"config annotation {tp!r} is not a plain TOML type")


def _is_plain(value: Any) -> bool:
    if isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_is_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def type_name(tp: Any) -> str:
    """A readable name for an annotation: 'int', 'list of int', 'one of 'a', 'b''."""
    if tp is Any:
        return "a plain value (number, string, bool, list or table)"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if tp is type(None):
        return "nothing (leave the key out)"
    if origin is list:
        return f"a list of {type_name(args[0]) if args else 'values'}"
    if origin is dict:
        return f"a table of {type_name(args[1]) if args else 'values'}"
    return {int: "an int", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", repr(tp))
    )


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _plain_copy(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_plain_copy(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain_copy(v) for k, v in value.items()}
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def check_choice(key: str, value: str, choices: list[str] | tuple[str, ...]) -> None:
    """ConfigError naming the nearest valid choice when ``value`` is not one of ``choices``."""
    if value in choices:
        return
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"{key}: unknown value {value!r}; {hint}valid: {', '.join(choices)}")


def check_positive(cfg: Config, *names: str, allow_zero: bool = False) -> None:
    """ConfigError for each named field that is not > 0 (>= 0 with ``allow_zero``)."""
    for name in names:
        value = getattr(cfg, name)
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"{cfg._key(name)} must be {bound}, got {value!r}")


def resolve_layers(spec: str | list[int], num_layers: int, key: str) -> list[int]:
    """The layer indices named by ``spec``: "all", "none", "every_other" (1, 3, 5, ...:
    the second layer of each pair, as GShard and Switch place their MoE layers) or a list
    of indices (negative ones count from the end)."""
    if isinstance(spec, str):
        if spec == "all":
            return list(range(num_layers))
        if spec == "none":
            return []
        if spec == "every_other":
            return list(range(1, num_layers, 2))
        check_choice(key, spec, ["all", "none", "every_other"])
    out = []
    for i in spec:
        if not -num_layers <= i < num_layers:
            raise ConfigError(f"{key}: layer {i} is out of range for {num_layers} layers")
        out.append(i % num_layers)
    if len(set(out)) != len(out):
        raise ConfigError(f"{key}: layer indices repeat: {list(spec)}")
    return sorted(out)


# -- MoE settings shared by the model configs ---------------------------------------------

MOE_FIELDS = (
    "num_experts",
    "top_k",
    "expert_hidden_dim",
    "router",
    "router_kwargs",
    "capacity_factor",
    "shared_expert_dim",
    "loss_weights",
    "dispatcher",
)


def check_moe_fields(cfg: Config) -> None:
    """Validate the MoE fields of a config (names in MOE_FIELDS) before any layer is built."""
    from ..dispatch import DISPATCHERS
    from ..routing import LOSSES, ROUTERS

    check_positive(cfg, "num_experts", "top_k", "expert_hidden_dim")
    check_positive(cfg, "shared_expert_dim", allow_zero=True)
    if cfg.top_k > cfg.num_experts:
        raise ConfigError(
            f"{cfg._key('top_k')}={cfg.top_k} exceeds num_experts={cfg.num_experts}; "
            "use top_k <= num_experts"
        )
    check_choice(cfg._key("router"), cfg.router, ROUTERS.names())
    params = inspect.signature(ROUTERS.get(cfg.router)).parameters
    accepted = [n for n in params if n not in ("self", "dim", "num_experts", "top_k")]
    for name in cfg.router_kwargs:
        if name not in accepted:
            raise ConfigError(
                unknown_key_message(name, accepted, f"{cfg._key('router_kwargs')} ({cfg.router!r})")
            )
    check_choice(cfg._key("dispatcher"), cfg.dispatcher, ["auto", *DISPATCHERS.names()])
    if cfg.capacity_factor is not None and not cfg.capacity_factor > 0:
        raise ConfigError(
            f"{cfg._key('capacity_factor')} must be > 0 (leave it out for dropless routing), "
            f"got {cfg.capacity_factor}"
        )
    for name, weight in cfg.loss_weights.items():
        check_choice(f"{cfg._key('loss_weights')} key", name, sorted(LOSSES))
        if weight < 0:
            raise ConfigError(f"{cfg._key('loss_weights')}.{name} must be >= 0, got {weight}")


def build_moe(cfg: Config, dim: int, hidden_dim: int, top_k: int | None = None, **kwargs: Any):
    """A gatelab ``MoE`` of width ``dim`` from a config's MoE fields (see MOE_FIELDS);
    ``top_k`` overrides the config's (a layer's K_max from ``k_schedule``)."""
    from ..layers import MoE

    return MoE(
        dim,
        hidden_dim,
        cfg.num_experts,
        cfg.top_k if top_k is None else top_k,
        router=cfg.router,
        dispatcher=cfg.dispatcher,
        shared_experts=cfg.shared_expert_dim,
        capacity_factor=cfg.capacity_factor,
        loss_weights=dict(cfg.loss_weights),
        router_kwargs=dict(cfg.router_kwargs),
        **kwargs,
    )


def layer_top_ks(cfg: Config, num_moe_layers: int) -> list[int]:
    """K_max of each of the ``num_moe_layers`` MoE layers, in order: ``top_k`` for every
    layer, or what ``k_schedule`` gives (``gatelab.routing.resolve_k_schedule``: a schedule
    name or one K_max per MoE layer, between ``k_schedule_min`` and ``top_k``)."""
    schedule = getattr(cfg, "k_schedule", None)
    if schedule is None or num_moe_layers == 0:
        return [cfg.top_k] * num_moe_layers
    from ..routing import K_SCHEDULES, resolve_k_schedule

    if isinstance(schedule, str):
        check_choice(cfg._key("k_schedule"), schedule, K_SCHEDULES.names())
    try:
        return resolve_k_schedule(
            schedule, num_moe_layers, cfg.k_schedule_min, cfg.top_k, cfg.num_experts
        )
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{cfg._key('k_schedule')}: {error}") from None
