# One image for every role: producer, GPU or CPU worker, migrations, flower.
#   docker build -t captcha-queue .
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t captcha-queue:cpu .   # no CUDA libs
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, in its own layer: the PyPI wheels bundle CUDA (GPU workers); TORCH_INDEX selects another build
ARG TORCH_INDEX=https://pypi.org/simple
RUN pip install --index-url "${TORCH_INDEX}" "torch==2.14.1" "torchvision==0.29.1"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY core core
COPY db db
COPY worker worker
COPY producer producer
RUN pip install ".[monitor]"

# never run the worker as root (Celery warns, and a decoded file must not be able to write anywhere)
RUN useradd --create-home --uid 10001 captcha \
 && mkdir /checkpoints && chown captcha /checkpoints  # a new named volume mounted here inherits the owner
USER captcha
WORKDIR /home/captcha

CMD ["captcha-queue", "--help"]
