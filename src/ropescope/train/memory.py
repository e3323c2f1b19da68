"""Memory a run needs, from a model's config alone, before renting GPUs: `ropescope plan`.

    ropescope plan --model meta-llama/Llama-2-7b-hf --length 32768 --gpus 8 --gpu-memory 80

Estimates the peak memory per device of three commands at a length: evaluation (`ppl`: one forward, the output head
over chunks of positions), the attention capture (`entropy`: one forward, per-layer statistics) and training (`train`:
one step; weights, gradients and AdamW state sharded over the GPUs as FSDP full shard or ZeRO-3 shard them,
activations with and without gradient checkpointing, the loss chunk). No weight is loaded: the parameter count comes
from the model built on the meta device.

The activation model is counted from the tensors autograd saves in a decoder layer of transformers' Llama (float32,
sdpa attention, measured on CPU at several widths): about 9 x hidden + 4 x intermediate + 2 x the key-value width
elements per token per layer; a checkpointed layer keeps 2 x hidden. A model with sliding-window layers
(Gemma 2/3, Mistral) adds its length x length attention mask once. Training follows `ropescope train`: float32
master weights, gradients and AdamW's two moments (16 bytes a parameter), the forward in the compute dtype. On a CPU
the process itself (Python, torch, transformers) is counted as RUNTIME_CPU_BYTES; on a GPU the count is allocated
memory (the CUDA context, about 0.5 GiB, comes on top). Checked against measured CPU peaks only
(benchmarks/memory_scaling.py); no GPU number exists yet.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

from ropescope.eval.nll import loss_chunk_size

GIB = 2**30
# Per token and layer, in elements: what autograd keeps of a decoder layer (fitted on Llama layers of hidden 64-256,
# intermediate 128-1024: within 3% of the measured count), and what a checkpointed layer keeps.
SAVED_PER_HIDDEN, SAVED_PER_INTERMEDIATE, SAVED_PER_KV = 9, 4, 2
CHECKPOINTED_PER_HIDDEN = 2
TRAIN_STATE_BYTES = 16  # per parameter: float32 weights, gradients and AdamW's two moments
EVAL_HEAD_CHUNK = 1024  # positions per chunk of the output head in `ppl` (eval/perplexity.py's default)
RUNTIME_CPU_BYTES = int(0.40 * GIB)  # a CPU process with torch and transformers loaded, before any tensor
COMMANDS = ("evaluation", "capture", "training", "training (checkpointing)")


@dataclass(frozen=True)
class Shape:
    """What the estimates read from a config."""

    parameters: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # per token: the active experts' width in a mixture of experts
    kv_size: int  # key-value heads x head size
    layers: int
    heads: int
    sliding_window: bool = False  # some layers attend within a window: their attention mask is built whole


def _has_sliding_layers(text) -> bool:
    if getattr(text, "sliding_window", None) is None or getattr(text, "use_sliding_window", True) is False:
        return False
    types = getattr(text, "layer_types", None)
    return types is None or "sliding_attention" in types


def model_shape(config) -> Shape:
    """Parameter count (the model built on the meta device: no memory, no weights) and the widths of `config`."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    experts = getattr(text, "num_experts_per_tok", None)
    intermediate = text.intermediate_size
    if experts:  # a mixture of experts: each token goes through `experts` expert MLPs (and a shared one, if any)
        expert_size = getattr(text, "moe_intermediate_size", None) or intermediate
        intermediate = experts * expert_size + (getattr(text, "shared_expert_intermediate_size", None) or 0)
    return Shape(parameters=sum(p.numel() for p in model.parameters()), vocab_size=text.vocab_size,
                 hidden_size=text.hidden_size, intermediate_size=intermediate, kv_size=kv_heads * head_dim,
                 layers=text.num_hidden_layers, heads=heads, sliding_window=_has_sliding_layers(text))


def layer_activations(shape: Shape, tokens: int, element_bytes: int) -> int:
    """Bytes autograd keeps for one decoder layer over `tokens` tokens."""
    per_token = SAVED_PER_HIDDEN * shape.hidden_size + SAVED_PER_INTERMEDIATE * shape.intermediate_size \
        + SAVED_PER_KV * shape.kv_size
    return tokens * per_token * element_bytes


def estimate(shape: Shape, length: int, gpus: int = 1, dtype_bytes: int = 2, on_cpu: bool = False) -> dict[str, int]:
    """Estimated peak bytes per device of each of COMMANDS for one sequence of `length` tokens.

    dtype_bytes: bytes of an element in the compute dtype (2 for bfloat16, 4 for float32). Training shards its
    float32 state (TRAIN_STATE_BYTES per parameter) over `gpus` devices; evaluation holds the weights in the
    compute dtype on each device.
    """
    runtime = RUNTIME_CPU_BYTES if on_cpu else 0
    weights = shape.parameters * dtype_bytes
    # a sliding window is a mask, length x length booleans shared by the layers, which sdpa turns into additive
    # floats of the compute dtype: quadratic in length, where causal attention alone needs no mask at all (Gemma 3
    # at 32K in float32, capture: 7.85 GiB estimated, 7.36 GiB measured peak)
    mask = length**2 * (1 + dtype_bytes) if shape.sliding_window else 0
    layer = layer_activations(shape, length, dtype_bytes)
    hidden = length * shape.hidden_size * dtype_bytes
    # evaluation: one layer's activations in flight, the final hidden states, a chunk's float32 logits and their
    # log-softmax
    evaluation = runtime + mask + weights + layer + hidden + 2 * min(length, EVAL_HEAD_CHUNK) * shape.vocab_size * 4
    capture = runtime + mask + weights + layer + hidden + shape.layers * shape.heads * length * 4  # + float32 entropies
    state = shape.parameters * TRAIN_STATE_BYTES // gpus
    if gpus > 1:  # a sharded step gathers one layer's full parameters at a time
        state += shape.parameters // shape.layers * dtype_bytes
    # the loss: one chunk's float32 logits, their log-softmax, their gradient and the head's input gradient, and the
    # hidden states' gradient
    loss = 4 * loss_chunk_size(length, shape.hidden_size, shape.vocab_size) * shape.vocab_size * 4 + 2 * hidden
    backward = layer  # one layer's gradients of activations in flight
    kept = shape.layers * layer
    checkpointed = shape.layers * length * CHECKPOINTED_PER_HIDDEN * shape.hidden_size * dtype_bytes + layer
    return {"evaluation": evaluation, "capture": capture,
            "training": runtime + mask + state + kept + backward + loss,
            "training (checkpointing)": runtime + mask + state + checkpointed + backward + loss}


def largest_length(shape: Shape, command: str, budget: int, gpus: int, dtype_bytes: int, on_cpu: bool,
                   limit: int = 1 << 24) -> int:
    """The largest length (a multiple of 1024, at most `limit`) whose estimate for `command` fits in `budget`
    bytes; 0 when not even 1024 tokens fit."""
    low, high = 0, limit // 1024
    while low < high:  # every estimate grows with length
        middle = (low + high + 1) // 2
        if estimate(shape, middle * 1024, gpus, dtype_bytes, on_cpu)[command] <= budget:
            low = middle
        else:
            high = middle - 1
    return low * 1024


def checkpointing_pays(shape: Shape, length: int, gpus: int = 1, dtype_bytes: int = 2,
                       device_memory: int | None = None) -> bool:
    """Whether gradient checkpointing saves more than it costs: the activations a step keeps without it exceed
    the training state (weights, gradients, optimizer), so they would at least double the step's memory, and (when
    `device_memory`, bytes, is given) the step would take more than half the device; below that, the third more
    compute buys nothing (the shipped model's fine-tunes fit a laptop either way)."""
    activations = shape.layers * layer_activations(shape, length, dtype_bytes)
    state = shape.parameters * TRAIN_STATE_BYTES // gpus
    return activations > state and (device_memory is None or activations + state > device_memory // 2)


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started its program: VmHWM belongs to the address space that
    execve made, whereas ru_maxrss keeps the parent's resident size at fork (a large pytest process's, say)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
