"""llmq's benchmark harness: every figure a ratio to a baseline measured in the same run."""
