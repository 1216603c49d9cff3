//! Integration tests: the real service against real Postgres and RabbitMQ.
//! Each test has its own database and its own exchange and queue names, so
//! they run concurrently and repeatedly.

mod helpers;

mod atomicity;
mod chaos;
mod delivery;
mod exactly_once;
mod hostile_input;
mod http_api;
mod pool;
mod validation;
