"""Training-data formats: rows per consumer (OpenAI/TRL, ShareGPT/LLaMA-Factory), their schemas,
the dataset card, near-duplicate detection."""
