//! Data: raw text → token shards (`mla prepare`), shard index, and the training/eval loader.
