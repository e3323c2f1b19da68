"""Pure evaluators: a loaded model in, rows out. Perplexity against length (perplexity.py), any retrieval task
over a grid (retrieval.py, greedy decoding in decoding.py), and the token losses both share (nll.py)."""
