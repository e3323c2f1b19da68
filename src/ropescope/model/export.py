"""GGUF export: a model folder ropescope saved (extended, or fine-tuned after) -> one GGUF file llama.cpp runs.

The file holds llama.cpp's `llama` architecture, its tensors named and laid out as llama.cpp's
convert_hf_to_gguf.py writes them (q and k rows permuted from Hugging Face's rotate-half layout to llama.cpp's
adjacent pairs; 1-D norms kept f32), the tokenizer (GPT-2-style byte-level BPE, `tokenizer.ggml.model` gpt2), the
RoPE as llama.cpp reads it (`ropescope.model.llamacpp.LlamaCppRope`: base, scaling type, factor, original context
length, attention factor, and the `rope_freqs` tensor of per-pair divisors where the extension is per pair), and
the spec ropescope recorded (`RECORD_KEY`), from which `--model OUT.gguf` reads the export back.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch

from ropescope.errors import RopescopeError
from ropescope.model.llamacpp import RECORD_KEY, LlamaCppRope, llamacpp_rope
from ropescope.model.patch import CONFIG_KEY, pretrained_rope, rotary_dim, spec_from_config
from ropescope.rope import RopeSpec

EXPORT_DTYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
}
# A tokenizer.json pre-tokenizer (type, and for Digits individual_digits) -> llama.cpp's name for the same
# splitting (llama-vocab.cpp); llama.cpp falls back to another regex for a name it lacks.
PRE_TOKENIZERS = {
    (("Digits", True), ("ByteLevel", None)): "smollm",  # single digits, then GPT-2's byte-level regex
    (("ByteLevel", None),): "gpt-2",
}
TOKEN_TYPES = {"normal": gguf.TokenType.NORMAL, "control": gguf.TokenType.CONTROL,
               "user": gguf.TokenType.USER_DEFINED, "unused": gguf.TokenType.UNUSED}


def export_spec(config) -> RopeSpec:
    """The spec a saved folder's config records (`extend` wrote it), the original RoPE for one never extended."""
    return spec_from_config(config) or RopeSpec("default")


def check_exportable(config) -> LlamaCppRope:
    """The llama.cpp RoPE of a model config, after refusing in one line what the llama architecture of a GGUF file
    cannot hold (another family, biases, partial rotary) or llama.cpp cannot compute (`llamacpp_rope`)."""
    if config.model_type != "llama":
        raise RopescopeError(f"export writes Llama models (llama.cpp's llama architecture); this one is a "
                             f"{config.model_type!r} model; accepted: model_type 'llama'")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise RopescopeError("export writes Llama models without biases; this one has attention_bias or mlp_bias")
    base, _ = pretrained_rope(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = rotary_dim(config, config.rope_parameters)
    if dim != head_dim:
        raise RopescopeError(f"export writes Llama models rotating the whole head; this one rotates {dim} of "
                             f"{head_dim} dimensions (partial_rotary_factor)")
    return llamacpp_rope(export_spec(config), dim, base)


def llama_layout(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q or k projection rows `[heads * head_dim, hidden]` from Hugging Face's layout (a head's first half rotates
    with its second) to llama.cpp's (pairs of adjacent rows), as convert_hf_to_gguf.py's LlamaModel.permute does."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensors(model, dtype: str) -> list[tuple[str, np.ndarray, gguf.GGMLQuantizationType]]:
    """`(gguf name, data, type)` of every weight of a Llama model, in the file's layout; a weight with no llama.cpp
    name is refused (the export would drop it)."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    _, kind = EXPORT_DTYPES[dtype]
    tensors = []
    for name, weight in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp uses token_embd when output.weight is absent
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise RopescopeError(f"export has no llama.cpp tensor for weight {name!r}; it writes Llama models")
        weight = weight.detach().to(torch.float32)
        if name.endswith("q_proj.weight"):
            weight = llama_layout(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = llama_layout(weight, config.num_key_value_heads)
        data = weight.numpy()
        if data.ndim == 1 or kind == gguf.GGMLQuantizationType.F32:  # norms stay f32, as convert_hf_to_gguf keeps them
            tensors.append((gguf_name, data, gguf.GGMLQuantizationType.F32))
        else:
            tensors.append((gguf_name, gguf.quants.quantize(data, kind), kind))
    return tensors


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer; refused for any other tokenizer."""
    model = tokenizer_json.get("model") or {}
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    shape = tuple((step.get("type"), step.get("individual_digits")) for step in steps)
    if model.get("type") != "BPE" or shape not in PRE_TOKENIZERS:
        raise RopescopeError(
            f"export writes GPT-2-style byte-level BPE tokenizers; this one is {model.get('type')!r} with the "
            f"pre-tokenizer {' + '.join(str(step[0]) for step in shape) or 'none'}; accepted: "
            + "; ".join(" + ".join(step for step, _ in key) for key in PRE_TOKENIZERS)
        )
    return PRE_TOKENIZERS[shape]


def token_list(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's token and llama.cpp token type (convert_hf_to_gguf.py's get_vocab_base): special added tokens
    are control tokens, other added ones user-defined, ids the tokenizer lacks unused padding."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    special = set(tokenizer.all_special_tokens) | {token.content for token in
                                                   tokenizer.added_tokens_decoder.values() if token.special}
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(TOKEN_TYPES["unused"])
        else:
            tokens.append(token)
            kind = "control" if token in special else "user" if token in added else "normal"
            types.append(TOKEN_TYPES[kind])
    return tokens, [int(kind) for kind in types]


def write_gguf(model, tokenizer, tokenizer_json: dict, rope: LlamaCppRope, path: Path, dtype: str = "f32") -> None:
    """Write a Llama `model` and its tokenizer with the llama.cpp RoPE `rope` as a GGUF file at `path` (which the
    caller makes atomic). `tokenizer_json`: the folder's tokenizer.json, read for its pre-tokenizer and merges."""
    config = model.config
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _write_model_keys(writer, config, dtype)
    _write_rope_keys(writer, rope, config)
    _write_tokenizer(writer, tokenizer, tokenizer_json, config)
    for name, data, kind in gguf_tensors(model, dtype):
        writer.add_tensor(name, data, raw_dtype=kind)
    if rope.rope_freqs is not None:  # one tensor shared by every layer, as llama.cpp loads it (llama-model.cpp)
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                          np.array(rope.rope_freqs, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_model_keys(writer: gguf.GGUFWriter, config, dtype: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(str(getattr(config, "_name_or_path", "") or "ropescope export"))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(EXPORT_DTYPES[dtype][0])


def _write_rope_keys(writer: gguf.GGUFWriter, rope: LlamaCppRope, config) -> None:
    writer.add_rope_freq_base(rope.freq_base)
    writer.add_rope_dimension_count(rope.dimension_count)
    writer.add_rope_scaling_type(gguf.RopeScalingType(rope.scaling_type))
    if rope.factor is not None:
        writer.add_rope_scaling_factor(rope.factor)
    if rope.original_context_length is not None:
        writer.add_rope_scaling_orig_ctx_len(rope.original_context_length)
    if rope.attn_factor != 1.0:
        writer.add_rope_scaling_attn_factors(rope.attn_factor)
    recorded = getattr(config, CONFIG_KEY, None)
    if recorded:
        writer.add_string(RECORD_KEY, json.dumps(recorded))


def _write_tokenizer(writer: gguf.GGUFWriter, tokenizer, tokenizer_json: dict, config) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_json))
    tokens, types = token_list(tokenizer, config.vocab_size)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = tokenizer_json["model"].get("merges", [])
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge) for merge in merges])
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        index = getattr(tokenizer, f"{name}_token_id", None)
        if index is None:
            index = getattr(config, f"{name}_token_id", None)
        if isinstance(index, int):
            add(index)
    # llama.cpp adds BOS to a prompt where the file says so: the same ids as the folder's own tokenizer
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bos is not None and tokenizer("a").input_ids[:1] == [bos])
