//! The amqp protocol handler (not implemented yet: building it fails with a
//! clear error so `protocols = ["amqp"]` is never silently accepted).

use handler_api::{HandlerError, HandlerFactory};

/// The handler's factory, registered by the gateway as `amqp`.
pub const FACTORY: HandlerFactory = HandlerFactory {
    name: "amqp",
    build: |_| Err(HandlerError::Config("the amqp handler is not implemented yet".into())),
};
