"""Deprecated: :class:`SharedExpert` is a dense FFN and lives in ``gatelab.layers.mlp`` now."""

from ..legacy import moved

__getattr__ = moved(__name__, {"SharedExpert": "gatelab.layers.mlp"})
