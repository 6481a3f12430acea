# mpprop on CPU. The working folder is mounted: it holds params.yaml, data/, models/, mlruns/.
#   docker build -t mpprop .
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD:/work" mpprop \
#       predict --property all --input structures/ --output preds.csv
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib

# g++ builds mpprop's fused CPU kernel (below, once, into TORCH_EXTENSIONS_DIR)
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
ENV TORCH_EXTENSIONS_DIR=/opt/torch_extensions

# CPU-only torch first, from PyTorch's index (the PyPI wheel pulls the CUDA stack, GBs), in
# its own layer so that code changes do not reinstall it
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /opt/mpprop
COPY pyproject.toml README.md ./
COPY src ./src
# the pin torch==2.13.0 is satisfied by the installed 2.13.0+cpu, so pip keeps it
RUN pip install . \
    && python -c "from mpprop.kernels import report_build; report_build()" \
    && chmod -R a+rwX /opt/torch_extensions

# not root by default; `--user "$(id -u):$(id -g)"` matches the owner of the mounted folder
RUN useradd --create-home --uid 1000 mpprop
USER mpprop
WORKDIR /work

ENTRYPOINT ["mpprop"]
CMD ["--help"]
