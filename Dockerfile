# One image for every VaLoRA service (engine, ingest, workers, ui); the command picks the role.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends libglib2.0-0 curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# PyPI's Linux torch wheel carries the CUDA runtime; the host needs only the NVIDIA driver and container toolkit.
RUN pip install "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY kernels kernels
COPY engine engine
COPY apps apps
COPY pipeline pipeline
COPY ui ui
RUN pip install .
COPY models /models

ENV VALORA_ENGINE__MODEL=/models/base \
    VALORA_ENGINE__ADAPTERS=/models/adapters \
    VALORA_REDIS__STATE_DIR=/state \
    VALORA_INGEST__MEDIA_DIR=/media

ENTRYPOINT ["valora"]
CMD ["--help"]
