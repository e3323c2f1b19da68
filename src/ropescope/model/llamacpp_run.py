"""llama.cpp run, not re-derived: an exported GGUF file's next-token logits in llama.cpp (through the
llama-cpp-python bindings, CPU, f32 KV cache) beside transformers' on the saved folder, on the same tokens. What
the llama.cpp tests and `benchmarks/llamacpp_smollm2.py` compare; llama_cpp is imported only when asked for.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def llamacpp_logits(path: str | Path, ids: list[int], all_positions: bool = True) -> np.ndarray:
    """llama.cpp's logits `[len(ids), vocab]` (or `[vocab]` of the last position) for `ids`, on the CPU."""
    # lazy: llama-cpp-python builds llama.cpp from source when installed, and not every machine has it
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=len(ids), n_batch=len(ids), n_ubatch=min(len(ids), 512),
                          logits_all=all_positions, n_threads=os.cpu_count(), verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        llm.eval(ids)
        if all_positions:
            return np.array(llm.scores[:len(ids)])
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
    finally:
        llm.close()


def transformers_logits(folder: str | Path, ids: list[int], all_positions: bool = True) -> np.ndarray:
    """Plain transformers' float32 logits on the saved folder, shaped as `llamacpp_logits`'."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids]), logits_to_keep=0 if all_positions else 1).logits[0]
    return logits.numpy() if all_positions else logits[-1].numpy()


def largest_difference(gguf_file: str | Path, folder: str | Path, ids: list[int],
                       all_positions: bool = True) -> float:
    """The largest absolute logit difference between llama.cpp on `gguf_file` and transformers on `folder`."""
    return float(np.abs(llamacpp_logits(gguf_file, ids, all_positions)
                        - transformers_logits(folder, ids, all_positions)).max())
