"""Cheap changes to a trained model: LoRA adapters, PHATGOOSE routing
among LoRA experts, early exit with learned gates (JEI-DNN), Dopamine neuron gates, and a
local expert + gate beside a frozen classifier, and MLP Memory (an MLP trained to imitate a
kNN-LM, interpolated with the LM), and FF-G2M GNN-to-MLP distillation. Dense -> MoE
upcycling and EvoMoE's expert diversify are weight conversions: :mod:`gatelab.convert`."""

from ..legacy import moved
from .advmoe import AdvMoEConfig, MoECNN, MoEConv2d, advmoe_step, pgd_linf, trades_loss, trades_step
from .dopamine import Dopamine, DopamineGate, activation_fraction, temperature_at
from .early_exit import (
    EarlyExitNet,
    ExitGate,
    expected_calibration_error,
    train_exit_heads,
    train_jei,
)
from .g2m import (
    GCN,
    G2MConfig,
    high_frequency_loss,
    low_frequency_loss,
    normalized_adjacency,
    train_student,
    train_teacher,
)
from .local_expert import LocalExpertMoE, LocalExpertOutput, train_local_expert
from .lora import (
    LoRALinear,
    add_lora,
    find_linear_targets,
    lora_modules,
    lora_parameters,
    merge_lora,
)
from .mlp_memory import (
    KNNDatastore,
    MLPMemory,
    final_hidden,
    interpolate,
    memory_loss,
    train_memory,
)
from .phatgoose import (
    GatedLoRALinear,
    PhatGooseLinear,
    PhatGooseRouter,
    phatgoose_model,
    train_gates,
    train_lora_expert,
)
from .upcycle import MOVED as _UPCYCLE_MOVED

__all__ = [
    "GCN",
    "G2MConfig",
    "high_frequency_loss",
    "low_frequency_loss",
    "normalized_adjacency",
    "train_student",
    "train_teacher",
    "AdvMoEConfig",
    "MoECNN",
    "MoEConv2d",
    "advmoe_step",
    "pgd_linf",
    "trades_loss",
    "trades_step",
    "Dopamine",
    "DopamineGate",
    "EarlyExitNet",
    "ExitGate",
    "GatedLoRALinear",
    "KNNDatastore",
    "LoRALinear",
    "LocalExpertMoE",
    "LocalExpertOutput",
    "MLPMemory",
    "PhatGooseLinear",
    "PhatGooseRouter",
    "activation_fraction",
    "add_lora",
    "expected_calibration_error",
    "final_hidden",
    "find_linear_targets",
    "interpolate",
    "lora_modules",
    "lora_parameters",
    "memory_loss",
    "merge_lora",
    "phatgoose_model",
    "temperature_at",
    "train_exit_heads",
    "train_gates",
    "train_jei",
    "train_local_expert",
    "train_lora_expert",
    "train_memory",
]

# Upcycling moved to gatelab.convert and transcoders to gatelab.inspect (issue 14); the old
# names import with a warning.
_TRANSCODER_NAMES = ("Transcoder", "evaluate_transcoder", "train_transcoder")
__getattr__ = moved(
    __name__, {**_UPCYCLE_MOVED, **dict.fromkeys(_TRANSCODER_NAMES, "gatelab.inspect.transcoder")}
)
