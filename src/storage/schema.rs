// @generated shape: matches `diesel print-schema` for migrations/.

diesel::table! {
    inbox (message_id) {
        message_id -> Text,
        order_id -> Uuid,
        processed_at -> Timestamptz,
    }
}

diesel::table! {
    orders (id) {
        id -> Uuid,
        status -> Text,
        correlation_id -> Text,
        customer_id -> Text,
        currency -> Text,
        total_cents -> Int8,
        items -> Jsonb,
        idempotency_key -> Nullable<Text>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    outbox (seq) {
        seq -> Int8,
        id -> Uuid,
        order_id -> Uuid,
        event_type -> Text,
        routing_key -> Text,
        correlation_id -> Text,
        payload -> Jsonb,
        created_at -> Timestamptz,
        attempts -> Int4,
        next_attempt_at -> Timestamptz,
        last_error -> Nullable<Text>,
    }
}

diesel::table! {
    outbox_dead (id) {
        id -> Uuid,
        order_id -> Uuid,
        event_type -> Text,
        routing_key -> Text,
        correlation_id -> Text,
        payload -> Jsonb,
        created_at -> Timestamptz,
        attempts -> Int4,
        last_error -> Nullable<Text>,
        dead_at -> Timestamptz,
    }
}

diesel::allow_tables_to_appear_in_same_query!(inbox, orders, outbox, outbox_dead);
