# fleetq images: the binaries (fleetq, fleetq-broker, fleetq-worker) on Debian with python3 for
# process-executor children such as the simulated GPU in examples/python.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin fleetq --bin fleetq-broker --bin fleetq-worker

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /opt/fleetq fleetq
COPY --from=build /src/target/release/fleetq /src/target/release/fleetq-broker /src/target/release/fleetq-worker /usr/local/bin/
COPY examples/python /opt/fleetq/examples/python
USER fleetq
WORKDIR /opt/fleetq
CMD ["fleetq", "--help"]
