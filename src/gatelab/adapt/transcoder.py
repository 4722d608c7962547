"""Deprecated: transcoders read a trained model's MLPs and live in :mod:`gatelab.inspect.transcoder`."""

from ..legacy import moved

_NAMES = ("Transcoder", "TranscoderHistory", "evaluate_transcoder", "replaced", "train_transcoder")
_NAMES += ("transcoder_loss",)
__getattr__ = moved(__name__, dict.fromkeys(_NAMES, "gatelab.inspect.transcoder"))
