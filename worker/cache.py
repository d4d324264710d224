"""Response cache and idempotent jobs in Redis.

Not yet in the pipeline: it lands with the cache issue.
"""
