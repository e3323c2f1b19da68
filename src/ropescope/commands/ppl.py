"""`ropescope ppl`: perplexity against length, from a model name to out/perplexity.csv and out/perplexity.png."""

from __future__ import annotations

from pathlib import Path

from ropescope.eval.perplexity import DEFAULT_CHUNK, PROTOCOLS, check_stride, evaluate_perplexity, long_documents
from ropescope.io.data import load_corpus
from ropescope.io.plots import plot_perplexity
from ropescope.io.results import write_rows
from ropescope.model.load import ModelOptions, extension_specs, load, load_tokenizer
from ropescope.model.resolve import resolve_model
from ropescope.rope import RopeSpec


def run_perplexity(model: str = "default", method: str | RopeSpec = "default", *, lengths=(256, 512, 1024, 2048),
                   protocols=PROTOCOLS, stride: int | None = None, factor: float | None = None,
                   original_max_position_embeddings: int | None = None, corpus=None, split: str = "validation",
                   documents: int | None = 4, head_chunk_size: int = DEFAULT_CHUNK,
                   options: ModelOptions | None = None,
                   out="results/ppl", progress: bool | None = None) -> list[dict]:
    """`ropescope ppl`: load the model (extended by `method`) and the corpus, evaluate, and write
    out/perplexity.csv and out/perplexity.png. The corpus is checked before the weights load."""
    source = resolve_model(model)
    (spec,) = extension_specs(source, [method], factor, original_max_position_embeddings)
    check_stride(stride, lengths)
    texts = load_corpus(corpus, split=split)
    long_documents(load_tokenizer(source), texts, max(lengths), 1)
    loaded = load(source, spec, options)
    rows = evaluate_perplexity(loaded.model, loaded.tokenizer, texts, lengths, protocols, stride, documents,
                               head_chunk_size, labels=loaded.labels.to_dict(), progress=progress)
    out = Path(out)
    write_rows(rows, out / "perplexity.csv")
    plot_perplexity(rows, out / "perplexity.png", loaded.labels.original_max_position_embeddings)
    return rows
