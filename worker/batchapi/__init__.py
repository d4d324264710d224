"""Half-price summarization through the providers' Batch APIs (issue 16)."""
