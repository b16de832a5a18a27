"""Write small GGUF files for the tests with the `gguf` package (no llama.cpp, no downloads).

:func:`write_llama_gguf` converts a transformers Llama folder (the tests' tiny demo model) the way
llama.cpp's ``convert_hf_to_gguf.py`` does: llama.cpp tensor names, q/k rows permuted into its
rotary layout, the byte-level BPE tokenizer as a ``gpt2`` vocabulary with merges, and the chat
template. Linear weights can be stored quantised (Q8_0) to exercise dequantisation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf.LlamaModel.permute; transformers reverses it on load.
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_llama_gguf(
    model_dir: Path,
    out_file: Path,
    *,
    quantize_linear: bool = False,
    architecture: str = "llama",
    name: str = "tiny-llama-demo",
) -> Path:
    """Write the Llama at ``model_dir`` as a GGUF file; returns ``out_file``.

    ``architecture`` is written as ``general.architecture`` (tests use it to write one transformers
    cannot load). With ``quantize_linear`` the 2-D projection weights are stored as Q8_0.
    """
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tensors = load_file(str(model_dir / "model.safetensors"))
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]

    writer = gguf.GGUFWriter(str(out_file), architecture)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantize_linear else gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(config["hidden_size"] // n_head)
    writer.add_rope_freq_base(
        float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    )
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])

    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    specials = {a["id"] for a in tok.get("added_tokens", []) if a.get("special")}
    tokens = [""] * len(vocab)
    for text, idx in vocab.items():
        tokens[idx] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL for i in range(len(tokens))]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    eos = config["eos_token_id"]
    writer.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)
    writer.add_pad_token_id(config["pad_token_id"])
    if tok_config.get("chat_template"):
        writer.add_chat_template(tok_config["chat_template"])
    elif (model_dir / "chat_template.jinja").is_file():
        writer.add_chat_template((model_dir / "chat_template.jinja").read_text())

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for layer in range(config["num_hidden_layers"]):
        for hf, cpp in per_layer.items():
            names[f"model.layers.{layer}.{hf}"] = f"blk.{layer}.{cpp}"
    for hf_name, array in tensors.items():
        data = np.ascontiguousarray(array.astype(np.float32))
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        cpp_name = names[hf_name]
        if quantize_linear and data.ndim == 2 and cpp_name.startswith("blk."):
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(cpp_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(cpp_name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file
