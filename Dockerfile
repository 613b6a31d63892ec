# Build: docker build -t aml-egress .
# Run as a sidecar: docker run -p 3128:3128 aml-egress
# Metrics for a Prometheus outside the container: mount a token file and set
#   AML_EGRESS__ADMIN__LISTEN=0.0.0.0:9464 AML_EGRESS__ADMIN__TOKEN_FILE=/run/secrets/admin-token
# (off loopback the admin listener refuses to start without a token).
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY benches ./benches
COPY tests ./tests
RUN cargo build --release --locked --bin aml-egress

FROM debian:bookworm-slim
RUN useradd --system --no-create-home --uid 10001 aml-egress
COPY --from=build /src/target/release/aml-egress /usr/local/bin/aml-egress
USER 10001
ENV AML_EGRESS__PROXY__LISTEN=0.0.0.0:3128
EXPOSE 3128 9464
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/aml-egress"]
CMD ["serve"]
