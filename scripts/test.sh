#!/usr/bin/env bash
# Brings up PostgreSQL and RabbitMQ, then runs the whole test suite: unit
# tests, the integration tests against the real services, and the examples'
# build. Each test makes its own database and broker names, so the suite can
# run concurrently with itself and again and again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
exec cargo test --locked --all-targets "$@"
