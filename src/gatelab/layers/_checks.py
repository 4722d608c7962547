"""Argument checks the layer constructors share: each error names the class and the argument."""

from __future__ import annotations


def check_positive(who: str, **values: int | None) -> None:
    """Each value must be a positive int; None means "use the default" and passes."""
    for name, value in values.items():
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{who}: {name} must be a positive int, got {value!r}")


def check_dropout(who: str, dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{who}: dropout must lie in [0, 1), got {dropout}")
