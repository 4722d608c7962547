"""Moved: the multi-task models are complete models and live in :mod:`gatelab.models.multitask`
(issue 14). The old import path still works, with a DeprecationWarning naming the new one."""

from ..legacy import moved

__getattr__ = moved(__name__, "gatelab.models.multitask")
