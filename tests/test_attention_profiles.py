"""Entropy profiles: binned means of the captured entropies."""

import math

import pytest
import torch

from tests.helpers import VOCAB, eager_entropies, tiny_model
from ropescope.attention.profiles import bin_positions, entropy_profile, position_bins
from ropescope.errors import RopescopeError


def test_position_bins_cover_the_length():
    assert position_bins(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert bin_positions(torch.arange(10.0), 4).tolist() == [6.0, 22.0, 17.0]


def test_profile_is_the_mean_of_eager_entropies():
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, VOCAB, (30,), generator=generator) for _ in range(2)]
    rows = entropy_profile(model, samples, position_bin_size=8, labels={"method": "default"}, progress=False)
    assert len(rows) == 2 * 4 * 4  # layers x heads x bins
    per_sample = torch.stack([eager_entropies(model, sample[None])[:, 0] for sample in samples])
    expected = per_sample.mean(0)
    for row in rows:
        start, end = row["position_start"], row["position_end"]
        for sample, value in enumerate(row["head_sample_entropy"]):  # over all the head's queries, on every bin
            assert value == pytest.approx(float(per_sample[sample, row["layer"], row["head"]].mean()), abs=1e-4)
        assert row["method"] == "default" and row["samples"] == 2 and row["length"] == 30
        assert row["entropy"] == pytest.approx(float(expected[row["layer"], row["head"], start:end].mean()), abs=1e-4)
        assert row["entropy_max"] == pytest.approx(sum(math.log(p + 1) for p in range(start, end)) / (end - start))


def test_profile_refuses_mixed_lengths_and_no_samples():
    model = tiny_model("llama")
    with pytest.raises(RopescopeError, match="lengths 10 and 12"):
        entropy_profile(model, [torch.zeros(10, dtype=torch.long), torch.zeros(12, dtype=torch.long)], progress=False)
    with pytest.raises(RopescopeError, match="no samples"):
        entropy_profile(model, [], progress=False)
