FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    TIKTOKEN_CACHE_DIR=/var/cache/llmq/tiktoken
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY producer ./producer
# Flower reads it from its working directory: runtime buckets, results without text.
COPY flowerconfig.py ./
RUN pip install --no-cache-dir . \
    && python -c "from worker import tokens; tokens.install_offline_encodings()" \
    && useradd --system --home /app llmq && chown -R llmq /var/cache/llmq
USER llmq
CMD ["celery", "-A", "worker", "worker", "--loglevel", "INFO", "-Q", "llm,batch"]
