"""Hugging Face ``transformers`` (v5) integration.

``register()`` adds gatelab's grouped dispatch to transformers' experts interface under the
name ``"gatelab"``, so any HF MoE model whose experts class is decorated with
``@use_experts_implementation`` can run on it::

    import gatelab.hf
    gatelab.hf.register()
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="gatelab")
    model.set_experts_implementation("gatelab")  # or switch a loaded model

Supported HF expert layouts (the decorator's flags, read from the experts module):

- fused gated experts, ``gate_up_proj`` [E, 2F, D] + ``down_proj`` [E, D, F]
  (Mixtral, Qwen2/Qwen3-MoE, OLMoE, DeepSeek-V3, ...);
- plain experts (``has_gate=False``), ``up_proj`` [E, F, D] (NemotronH);
- transposed storage (``is_transposed=True``), [E, in, out] (Aria, GPT-OSS);
- per-expert biases (``has_bias=True``) and custom gates, including GPT-OSS's
  interleaved, clamped gate/up (``_apply_gate`` is used as the activation).

Not supported: ``has_post_expert_norm`` experts and expert-parallel (sharded) experts;
use ``experts_implementation="grouped_mm"`` for those.
"""

from __future__ import annotations

_NEED = "gatelab.hf needs transformers>=5: pip install 'gatelab[hf]'"

try:
    import transformers as _transformers
    from transformers.integrations.moe import ExpertsInterface as _ExpertsInterface  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(_NEED) from exc

if int(_transformers.__version__.split(".")[0]) < 5:  # pragma: no cover
    raise ImportError(_NEED + f" (found transformers {_transformers.__version__})")

from .access import (  # noqa: E402  (the access layer's HF adapter)
    HFAdapter,
    is_hf_directory,
    load_pretrained,
    routing_from_hf,
    routing_to_hf,
)
from .experts import (  # noqa: E402  (after the transformers check)
    IMPLEMENTATION,
    expert_weights_from_hf,
    gatelab_experts_forward,
    register,
)

__all__ = [
    "IMPLEMENTATION",
    "HFAdapter",
    "expert_weights_from_hf",
    "gatelab_experts_forward",
    "is_hf_directory",
    "load_pretrained",
    "register",
    "routing_from_hf",
    "routing_to_hf",
]
