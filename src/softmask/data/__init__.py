"""Data: tokenisation (and, with the pretraining engine, annotations, shards and transforms)."""
