# flexlb image for docker-compose.yml: the CLI (router, master, simulated workers, benchmarks); Redis runs apart.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY flexlb ./flexlb
COPY lua ./lua
COPY protos ./protos
RUN pip install --no-cache-dir . && useradd --create-home flexlb
USER flexlb
ENTRYPOINT []
