# wsrelay as a container image: a Rust stage builds the release binary, a slim Debian stage runs
# it as an unprivileged user (uid 10001, as deploy/kubernetes/deployment.yaml expects).
#
#   docker build -t wsrelay .
#   docker run --rm -p 8080:8080 -v "$PWD/wsrelay.toml:/etc/wsrelay/wsrelay.toml:ro" wsrelay

# The workspace's rust-version; Debian bookworm matches the runtime stage's libc.
FROM rust:1.95-slim-bookworm AS builder
WORKDIR /src
# ring (rustls' crypto) compiles C: the slim image's gcc is enough, no other system library is
# linked. Only the crates the workspace lists are copied, so that a change to the docs or the
# deploy files does not rebuild.
COPY Cargo.toml Cargo.lock ./
COPY relay relay
COPY protocol protocol
COPY client-sdk client-sdk
COPY loadtest loadtest
COPY testkit testkit
COPY tests tests
COPY examples examples
RUN cargo build --release --locked -p wsrelay --bin wsrelay \
    && cp target/release/wsrelay /usr/local/bin/wsrelay

FROM debian:bookworm-slim
# ca-certificates: the system roots that wss:// backends without `tls.ca_file` are verified
# against. coreutils' sleep (in the base image) is what the Kubernetes preStop runs. Not pinned
# (DL3008): the roots should be the newest the release has, on every rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 wsrelay \
    && useradd --system --uid 10001 --gid wsrelay --no-create-home --shell /usr/sbin/nologin wsrelay
COPY --from=builder /usr/local/bin/wsrelay /usr/local/bin/wsrelay
USER 10001:10001
# 8080: clients (`[server] listen`); 9090: the admin listener (`[server] admin`), as in
# deploy/kubernetes/configmap.yaml.
EXPOSE 8080 9090
# The orchestrator's probes (/healthz, /readyz) watch the relay: the image has no HTTP client,
# and a second probe inside the container would only duplicate them.
ENTRYPOINT ["/usr/local/bin/wsrelay"]
CMD ["--config", "/etc/wsrelay/wsrelay.toml"]
