"""Attention through a lens: streaming entropy, attention against distance, and attention uncertainty.

entropy.py     pure streaming math (torch and math only)
capture.py     post-RoPE q, k of every layer during an ordinary forward pass
profiles.py    entropy against query position
patterns.py    attention against key distance, pattern preservation (Jensen-Shannon)
uncertainty.py answering-query entropy and needle mass against retrieval errors, AUROC
runs.py        the end-to-end analyses the CLI runs
"""

from ropescope.attention.capture import LayerAttention, capture_attention, layer_entropies
from ropescope.attention.entropy import (
    AttentionStatistics,
    attention_entropy,
    attention_statistics,
    distance_bin_edges,
    distance_bins,
)
from ropescope.attention.patterns import distance_distribution, jensen_shannon, pattern_preservation
from ropescope.attention.profiles import entropy_profile
from ropescope.attention.uncertainty import answer_attention, auroc, failure_summary, retrieval_attention

__all__ = [
    "AttentionStatistics", "LayerAttention", "answer_attention", "attention_entropy", "attention_statistics",
    "auroc", "capture_attention", "distance_bin_edges", "distance_bins", "distance_distribution", "entropy_profile",
    "failure_summary", "jensen_shannon", "layer_entropies", "pattern_preservation", "retrieval_attention",
]
