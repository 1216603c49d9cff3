#!/usr/bin/env bash
# Brings up PostgreSQL and RabbitMQ, then builds and runs the service on
# http://127.0.0.1:8080 (settings from the environment or ./.env, see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
exec cargo run --release --locked --bin order-pipeline -- serve
