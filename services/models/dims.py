"""The sizes a FLOP count needs, read off a transformers causal LM (works on a meta-device model: no weights).

Shared by the teacher (advertised in ModelInfo, so a remote trainer can count teacher compute without the
teacher's files) and the trainer's FLOP accounting (`trainer/flops.py`).
"""

from __future__ import annotations


def flop_dims(model) -> dict[str, int]:
    """n_layer, d_attn (heads x head_dim), layer_params (matrix weights of the decoder layers), head_params."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    layers = model.get_decoder().layers
    head = model.get_output_embeddings().weight
    return {
        "n_layer": len(layers),
        "d_attn": heads * head_dim,
        "layer_params": sum(p.numel() for p in layers.parameters() if p.dim() >= 2),
        "head_params": int(head.shape[0] * head.shape[1]),
    }


def flop_dims_from_config(config) -> dict[str, int]:
    """`flop_dims` of the model a config describes, built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return flop_dims(model)
