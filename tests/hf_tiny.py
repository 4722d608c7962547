"""Tiny random HF MoE models of each family, built from their configs (shared by tests)."""

from __future__ import annotations

import torch
import transformers
from transformers import AutoModelForCausalLM

VOCAB = 64
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
MOE = dict(intermediate_size=48, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2)


def config(name: str):
    """The config of family ``name``'s tiny model."""
    if name == "mixtral":
        return transformers.MixtralConfig(
            **COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2
        )
    if name == "qwen2_moe":  # norm_topk_prob False: weights are softmax over all experts
        return transformers.Qwen2MoeConfig(
            **COMMON,
            **MOE,
            shared_expert_intermediate_size=48,
            decoder_sparse_step=1,
            norm_topk_prob=False,
        )
    if name == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**COMMON, **MOE, head_dim=8, norm_topk_prob=True)
    if name == "olmoe":
        return transformers.OlmoeConfig(
            **COMMON, intermediate_size=32, num_experts=8, num_experts_per_tok=2
        )
    if name == "deepseek_v3":
        return transformers.DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": 4},
            intermediate_size=48,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            first_k_dense_replace=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        )
    if name == "gpt_oss":
        return transformers.GptOssConfig(
            **COMMON,
            intermediate_size=32,
            num_local_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    raise ValueError(name)


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]


def build(name: str, implementation: str = "eager", seed: int = 0):
    """A random model of family ``name`` in eval mode, with nonzero biases where HF starts
    them at zero (GPT-OSS experts, DeepSeek's e_score_correction_bias) and routers at a
    scale that spreads tokens over experts."""
    torch.manual_seed(seed)
    if implementation == "gatelab":
        import gatelab.hf

        gatelab.hf.register()
    model = AutoModelForCausalLM.from_config(
        config(name), experts_implementation=implementation, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith(("gate.weight", "router.weight")):
                param.normal_(0.0, 0.5)
            elif ".experts." in pname and pname.endswith("_bias"):
                param.normal_(0.0, 0.1)
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if bias is not None:
                bias.copy_(torch.rand(bias.shape) * 0.5)
    return model


def ids(batch: int = 2, seq: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
