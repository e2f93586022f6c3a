"""Data layer: files -> token shards (pretrain) and text records (conversations, preference pairs, prompts)."""
