DROP TABLE inbox;
DROP TABLE outbox_dead;
DROP TABLE outbox;
DROP TABLE orders;
