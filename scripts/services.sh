#!/usr/bin/env bash
# Makes sure PostgreSQL (127.0.0.1:5432, user postgres, no password) and RabbitMQ
# (127.0.0.1:5672, guest/guest) are up on this machine, the defaults of every
# setting. Idempotent: what already runs is left alone.
#   - reachable already           -> nothing to do
#   - nothing installed, but a Docker engine runs -> a container of each,
#     configured like the defaults (trust auth, guest/guest)
#   - otherwise (Debian/Ubuntu)   -> apt-get install what is missing, start what is stopped
set -euo pipefail

cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

say() { printf 'services: %s\n' "$*"; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # what, seconds, command...
    local what=$1 secs=$2; shift 2
    for _ in $(seq "$secs"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
    say "$what did not come up within ${secs}s"; return 1
}

pg_ok() { pg_isready -q -h 127.0.0.1 -p 5432 && psql -h 127.0.0.1 -U postgres -d postgres -Atqc 'select 1' >/dev/null; }
mq_ok() { port_open 5672; }  # RabbitMQ opens the AMQP port once it has booted

if port_open 5432 && port_open 5672 && { ! command -v pg_isready >/dev/null || pg_ok; }; then
    say "PostgreSQL and RabbitMQ are up"; exit 0
fi

if ! command -v pg_ctlcluster >/dev/null && ! command -v rabbitmq-server >/dev/null \
    && command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    say "starting PostgreSQL and RabbitMQ containers (development settings)"
    docker start order-pipeline-postgres 2>/dev/null || docker run -d --name order-pipeline-postgres \
        -p 127.0.0.1:5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:15 >/dev/null
    docker start order-pipeline-rabbitmq 2>/dev/null || docker run -d --name order-pipeline-rabbitmq \
        -p 127.0.0.1:5672:5672 rabbitmq:3 >/dev/null
    wait_for "PostgreSQL" 60 port_open 5432
    wait_for "RabbitMQ" 90 port_open 5672
    sleep 3 # both open their port a moment before they take connections
    say "PostgreSQL and RabbitMQ are up"
    exit 0
fi

apt_install() {
    say "installing $*"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# --- PostgreSQL
command -v pg_ctlcluster >/dev/null || apt_install postgresql postgresql-client
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    say "starting PostgreSQL $version"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_for "PostgreSQL" 60 pg_isready -q -h 127.0.0.1 -p 5432
fi
if ! psql -h 127.0.0.1 -U postgres -d postgres -Atqc 'select 1' >/dev/null 2>&1; then
    # A fresh Debian cluster asks for a password on TCP; the service's default
    # DATABASE_URL has none. Trust loopback only, for this development machine.
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    hba=/etc/postgresql/$version/main/pg_hba.conf
    say "allowing passwordless loopback connections in $hba (development only)"
    $SUDO sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    wait_for "PostgreSQL (trust auth)" 30 pg_ok
fi

# --- RabbitMQ
command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
if ! port_open 5672; then
    say "starting RabbitMQ"
    $SUDO rabbitmq-server -detached || true
fi
wait_for "RabbitMQ" 90 mq_ok
say "PostgreSQL and RabbitMQ are up"
