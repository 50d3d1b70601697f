"""Data: one sample schema for every corpus, the synthetic corpus, shards, features, loaders."""
