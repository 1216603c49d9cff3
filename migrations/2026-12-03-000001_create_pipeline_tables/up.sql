-- The pipeline's tables. The outbox is the source of truth for "still to be
-- published": a row is deleted only after the broker confirmed its message.

CREATE TABLE orders (
    id              uuid PRIMARY KEY,
    -- Only ever moves forward: accepted -> published -> processed.
    status          text        NOT NULL DEFAULT 'accepted'
                    CHECK (status IN ('accepted', 'published', 'processed')),
    correlation_id  text        NOT NULL,
    customer_id     text        NOT NULL,
    currency        text        NOT NULL,
    total_cents     bigint      NOT NULL,
    items           jsonb       NOT NULL,
    -- A client's Idempotency-Key. The unique constraint, not a read before the
    -- write, is what makes concurrent retries create one order. Set to NULL
    -- when the key expires (see storage::orders::expire_idempotency_keys).
    idempotency_key text        UNIQUE,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Finds keys to expire without scanning every order.
CREATE INDEX orders_idempotency_key_created_at ON orders (created_at)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE outbox (
    -- Claim order: oldest first.
    seq             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The event id: the AMQP message_id, the same on every re-publication.
    id              uuid        NOT NULL UNIQUE,
    order_id        uuid        NOT NULL,
    event_type      text        NOT NULL,
    routing_key     text        NOT NULL,
    correlation_id  text        NOT NULL,
    -- The message body, fixed when the order committed.
    payload         jsonb       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- Publication attempts the broker refused (nack or return).
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text
);

CREATE INDEX outbox_next_attempt_at ON outbox (next_attempt_at);

-- Outbox messages that failed too often; moved back by the admin requeue.
CREATE TABLE outbox_dead (
    id              uuid        PRIMARY KEY,
    order_id        uuid        NOT NULL,
    event_type      text        NOT NULL,
    routing_key     text        NOT NULL,
    correlation_id  text        NOT NULL,
    payload         jsonb       NOT NULL,
    created_at      timestamptz NOT NULL,
    attempts        integer     NOT NULL,
    last_error      text,
    dead_at         timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX outbox_dead_dead_at ON outbox_dead (dead_at, id);

-- Message ids the order processor has handled: its primary key is what drops
-- a redelivered or re-published message.
CREATE TABLE inbox (
    message_id   text        PRIMARY KEY,
    order_id     uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now()
);
