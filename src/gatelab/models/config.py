"""The shared logic of model configs: plain-typed dataclasses that map one-to-one onto TOML.

A model config is a frozen dataclass deriving from :class:`Config`. Its fields hold only
what TOML can write (int, float, str, bool, lists and string-keyed tables of those) or a
nested config (a sub-table such as ``[model.moe]``), so a recipe's ``[model]`` table is
``Config.from_dict(table)`` and ``to_dict()`` writes it back.

- ``from_dict`` rejects unknown keys, naming the nearest valid one (difflib), and missing
  keys take their defaults.
- Every value is checked against its field's annotation at construction (``from_dict``,
  the constructor and ``replace`` alike); an int is accepted where a float is expected and
  stored as a float, a tuple where a list is expected and stored as a list.
- A nested config field takes a config or a table; a table changes the field's default
  (the owner's own defaults, e.g. ``MLPConfig``'s narrower experts), key by key.
- TOML has no null: a field that may be ``None`` must default to ``None``, and ``to_dict``
  leaves ``None`` values out, so a missing key reads back as ``None``.
- Subclasses add cross-field checks in ``validate()``, raising :class:`ConfigError`.
- Keys that moved into a nested config (``_moved``: old key -> "section.key") still work
  in ``from_dict``, the constructor, ``replace`` and attribute reads, with a
  DeprecationWarning naming the new key (``from_dict``, fed by recipes and checkpoints,
  also prints it as one line on stderr).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import math
import sys
import types
import typing
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Literal, TypeVar, Union

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A config value or key a user can fix; the message names the key."""


class _ConfigMeta(type):
    """Folds moved keys (``Config._moved``) into their nested config before ``__init__``,
    so ``LMConfig(num_experts=4)`` and ``dataclasses.replace`` keep working."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls._moved:
            kwargs = cls._fold_moved(kwargs)
        return super().__call__(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class Config(metaclass=_ConfigMeta):
    """Base of the model configs: type checks, ``from_dict``, ``to_dict``, ``replace``."""

    # Old key -> "section.key" of a nested config field (see the module docstring).
    _moved: typing.ClassVar[dict[str, str]] = {}

    # What error messages call this config's keys ("data" -> "data.seq_len"); None: the
    # class name ("LMConfig.dim").
    _where: typing.ClassVar[str | None] = None

    def __post_init__(self) -> None:
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):
            tp = hints[f.name]
            if _is_config_type(tp):
                object.__setattr__(self, f.name, self._nested(f, tp, getattr(self, f.name)))
        check_fields(self, type(self)._where or type(self).__name__)
        self.validate()

    def validate(self) -> None:
        """Cross-field checks of a subclass; raise :class:`ConfigError` naming the key."""

    @classmethod
    def _key(cls, name: str) -> str:
        return f"{cls._where or cls.__name__}.{name}"

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
        data = cls._fold_moved(data, stderr=True)
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
        changes = self._fold_moved(changes, current=self)
        valid = self.keys()
        for key in changes:
            if key not in valid:
                raise ConfigError(unknown_key_message(key, valid, type(self).__name__))
        return dataclasses.replace(self, **changes)

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: a moved key read under its old name.
        moved = type(self)._moved.get(name)
        if moved is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        where = type(self).__name__
        warnings.warn(
            f"{where}.{name} is deprecated: read {where}.{moved} (model.{moved} in a recipe)",
            DeprecationWarning,
            stacklevel=2,
        )
        section, key = moved.split(".")
        return getattr(getattr(self, section), key)

    @classmethod
    def upgrade_table(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """``data`` (a table of this config, maybe written by an earlier version) with the
        moved keys written into their nested tables, silently: what today's recipe for the
        same model says (e.g. to compare an old checkpoint's config with a new recipe)."""
        return cls._fold_moved(data, warn=False)

    @classmethod
    def _fold_moved(
        cls,
        data: Mapping[str, Any],
        stderr: bool = False,
        current: Config | None = None,
        warn: bool = True,
    ) -> dict[str, Any]:
        """``data`` with the moved keys written into their nested config (the one in
        ``data``, else ``current``'s, else a table over the field's default)."""
        old = {k: cls._moved[k] for k in data if k in cls._moved}
        out = {k: v for k, v in data.items() if k not in old}
        if not old:
            return out
        by_section: dict[str, dict[str, Any]] = {}
        for key, moved in old.items():
            section, name = moved.split(".")
            by_section.setdefault(section, {})[name] = data[key]
        for section, changes in by_section.items():
            nested = out.get(section, getattr(current, section, None) or {})
            if isinstance(nested, Config):
                with nested_errors(cls, section, type(nested)):
                    out[section] = nested.replace(**changes)
            elif isinstance(nested, Mapping):
                out[section] = {**nested, **changes}
        message = _moved_message(old)
        if warn:
            warnings.warn(message, DeprecationWarning, stacklevel=3)
        if stderr:
            print(f"gatelab: {message}", file=sys.stderr)
        return out

    def _nested(self, f: dataclasses.Field, tp: type[Config], value: Any) -> Config:
        """A nested config field's value: a config as is, a table over the default."""
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"{self._key(f.name)}: expected a table ({tp.__name__}), got {_describe(value)}"
            )
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else tp()
        with nested_errors(type(self), f.name, tp):
            return default.replace(**value)


def _is_config_type(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Config)


def _moved_message(old: Mapping[str, str]) -> str:
    moves = ", ".join(f"model.{k} is now model.{v}" for k, v in old.items())
    sections = sorted({v.split(".")[0] for v in old.values()})
    tables = ", ".join(f"[model.{s}]" for s in sections)
    return f"deprecated flat keys: {moves} (new recipes write them in a {tables} table)"


@contextlib.contextmanager
def nested_errors(owner: type[Config], section: str, nested: type[Config]) -> Iterator[None]:
    """Re-raise a nested config's ConfigError naming the key as the owner sees it:
    'MoEConfig.top_k' -> 'LMConfig.moe.top_k'."""
    try:
        yield
    except ConfigError as error:
        name, where = nested.__name__, f"{owner.__name__}.{section}"
        text = str(error).replace(f"{name}.", f"{where}.").replace(f"in {name};", f"in {where};")
        raise ConfigError(text) from None


def unknown_key_message(key: object, valid: list[str], where: str) -> str:
    """'unknown key ... did you mean ...?' with the nearest valid key, or the valid keys."""
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"valid keys are: {', '.join(valid)}"
    return f"unknown key {key!r} in {where}; {hint}"


def check_fields(obj: Any, where: str) -> None:
    """Check every field of the dataclass ``obj`` against its annotation and store the
    normalised value (an int where a float is expected becomes a float, a list where a
    tuple is expected a tuple); ConfigError naming ``where.field`` and the value given.
    Nested config fields are their own config's job and are skipped. The one type check of
    every config: the model configs, ``MoEConfig``, the data configs and ``TrainConfig``."""
    hints = _type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if not _is_config_type(hints[f.name]):
            value = check_value(getattr(obj, f.name), hints[f.name], f"{where}.{f.name}")
            object.__setattr__(obj, f.name, value)


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
    if tp is float:  # finite: inf and NaN pass every "> 0" check and fail mid-run instead
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
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
    if origin is tuple:
        return _match_tuple(value, args)
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


def _match_tuple(value: Any, args: tuple) -> tuple[bool, Any]:
    """``tuple[int, ...]`` (any length) or ``tuple[float, float]`` (that length); a list is
    accepted (TOML has no tuples) and stored as a tuple."""
    if not isinstance(value, list | tuple):
        return False, None
    items = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
    if len(items) != len(value):
        return False, None
    out = []
    for v, item in zip(value, items, strict=True):
        ok, checked = _match(v, item)
        if not ok:
            return False, None
        out.append(checked)
    return True, tuple(out)


def _is_plain(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, bool | int | str):
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
        return f"a table of {_plural(type_name(args[1])) if args else 'values'}"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {type_name(args[0])}"
        return f"a list of {len(args)}: " + ", ".join(type_name(a) for a in args)
    return {int: "an int", float: "a finite number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", repr(tp))
    )


def _plural(name: str) -> str:
    """'an int' -> 'ints', 'a finite number' -> 'finite numbers' (for 'a table of ...')."""
    for article in ("a ", "an "):
        if name.startswith(article) and " or " not in name and " of " not in name:
            return name[len(article) :] + "s"
    return name


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _plain_copy(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, list | tuple):
        return [_plain_copy(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain_copy(v) for k, v in value.items()}
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
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


# -- The MoE settings the model configs share ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class MoEConfig(Config):
    """The MoE layers of a model: a recipe's ``[model.moe]`` table (torchtitan's ``MoEArgs``),
    shared by :class:`~gatelab.models.LMConfig` and :class:`~gatelab.models.MLPConfig`
    (which of a model's layers are MoE stays the model's ``moe_layers``).

    ``num_experts`` routed experts of hidden width ``hidden_dim``, ``top_k`` per token,
    chosen by the router ``router`` (a name in ``gatelab.routing.ROUTERS``) built with
    ``router_kwargs``; ``capacity_factor`` (left out: dropless); a shared expert of hidden
    width ``shared_hidden_dim`` every token also passes (0: none); the auxiliary
    ``loss_weights`` (names in ``gatelab.routing.LOSSES``); ``dispatcher`` ("auto",
    "grouped", "loop"). ``k_schedule`` (left out: ``top_k`` everywhere) gives each MoE layer
    its own K_max: a name in ``gatelab.routing.K_SCHEDULES`` ("uniform", "descending",
    "ascending", "pyramid", "valley", "wave") spreading K_max between ``k_schedule_min`` and
    ``top_k`` over the MoE layers, or a list with one K_max per MoE layer; with the
    ``dynamic_k`` and ``top_p`` routers K_max bounds each token's number of experts.

    The defaults are the demo LM's; a model config may default to others (``MLPConfig``).
    Earlier versions wrote these keys flat in ``[model]`` (see :data:`FLAT_MOE_KEYS`).
    """

    num_experts: int = 8
    top_k: int = 2
    hidden_dim: int = 512
    router: str = "topk"
    router_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    capacity_factor: float | None = None
    shared_hidden_dim: int = 0
    loss_weights: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"balance": 0.01, "z": 0.001}
    )
    dispatcher: str = "auto"
    k_schedule: str | list[int] | None = None
    k_schedule_min: int = 1

    def validate(self) -> None:
        from ..dispatch import DISPATCHERS
        from ..routing import LOSSES

        check_positive(self, "num_experts", "top_k", "hidden_dim")
        check_positive(self, "shared_hidden_dim", allow_zero=True)
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"{self._key('top_k')}={self.top_k} exceeds num_experts={self.num_experts}; "
                "use top_k <= num_experts"
            )
        self._check_router()
        check_choice(self._key("dispatcher"), self.dispatcher, ["auto", *DISPATCHERS.names()])
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(
                f"{self._key('capacity_factor')} must be > 0 (leave it out for dropless "
                f"routing), got {self.capacity_factor}"
            )
        for name, weight in self.loss_weights.items():
            check_choice(f"{self._key('loss_weights')} key", name, sorted(LOSSES))
            if weight < 0:
                raise ConfigError(f"{self._key('loss_weights')}.{name} must be >= 0, got {weight}")

    def _check_router(self) -> None:
        from ..routing import ROUTERS

        check_choice(self._key("router"), self.router, ROUTERS.names())
        params = inspect.signature(ROUTERS.get(self.router)).parameters
        accepted = [n for n in params if n not in ("self", "dim", "num_experts", "top_k")]
        for name in self.router_kwargs:
            if name not in accepted:
                where = f"{self._key('router_kwargs')} ({self.router!r})"
                raise ConfigError(unknown_key_message(name, accepted, where))
        # Each value against the router's own annotation (normalize = "x" is refused here,
        # not taken as true); annotations that are not plain TOML types are left to the router.
        try:
            hints = typing.get_type_hints(ROUTERS.get(self.router).__init__)
        except (NameError, TypeError):
            hints = {}
        for name, value in self.router_kwargs.items():
            with contextlib.suppress(TypeError):
                check_value(value, hints.get(name, Any), f"{self._key('router_kwargs')}.{name}")

    def build(self, dim: int, top_k: int | None = None, **kwargs: Any):
        """A gatelab ``MoE`` of width ``dim``; ``top_k`` overrides the config's (a layer's
        K_max from ``k_schedule``); ``kwargs`` go to ``MoE`` (``experts``, ``act``...)."""
        from ..layers.moe import MoE

        return MoE(
            dim,
            self.hidden_dim,
            self.num_experts,
            self.top_k if top_k is None else top_k,
            router=self.router,
            dispatcher=self.dispatcher,
            shared_hidden_dim=self.shared_hidden_dim,
            capacity_factor=self.capacity_factor,
            loss_weights=dict(self.loss_weights),
            router_kwargs=dict(self.router_kwargs),
            **kwargs,
        )

    def layer_top_ks(self, num_moe_layers: int) -> list[int]:
        """K_max of each of the ``num_moe_layers`` MoE layers, in order: ``top_k`` for every
        layer, or what ``k_schedule`` gives (``gatelab.routing.resolve_k_schedule``)."""
        schedule = self.k_schedule
        if schedule is None or num_moe_layers == 0:
            return [self.top_k] * num_moe_layers
        from ..routing import K_SCHEDULES, resolve_k_schedule

        if isinstance(schedule, str):
            check_choice(self._key("k_schedule"), schedule, K_SCHEDULES.names())
        try:
            return resolve_k_schedule(
                schedule, num_moe_layers, self.k_schedule_min, self.top_k, self.num_experts
            )
        except (ValueError, TypeError) as error:
            raise ConfigError(f"{self._key('k_schedule')}: {error}") from None


# The flat ``[model]`` keys of earlier versions -> their place in ``[model.moe]``.
FLAT_MOE_KEYS = {
    "num_experts": "moe.num_experts",
    "top_k": "moe.top_k",
    "expert_hidden_dim": "moe.hidden_dim",
    "router": "moe.router",
    "router_kwargs": "moe.router_kwargs",
    "capacity_factor": "moe.capacity_factor",
    "shared_expert_dim": "moe.shared_hidden_dim",
    "loss_weights": "moe.loss_weights",
    "dispatcher": "moe.dispatcher",
    "k_schedule": "moe.k_schedule",
    "k_schedule_min": "moe.k_schedule_min",
}
