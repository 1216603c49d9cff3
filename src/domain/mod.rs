//! The domain: orders, their validation and their forward-only status.

pub mod order;

pub use order::{Item, NewOrder, Order, OrderRequest, OrderStatus, ValidationError};
