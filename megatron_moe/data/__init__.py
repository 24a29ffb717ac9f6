"""Data: corpus readers, tokenizers and the packed language-model batches the trainer consumes."""
