"""Deprecated: transcoders read a trained model's MLPs and live in :mod:`gatelab.inspect.transcoder`."""

from ..legacy import moved

__getattr__ = moved(__name__, "gatelab.inspect.transcoder")
