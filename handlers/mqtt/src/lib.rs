//! The mqtt protocol handler (not implemented yet: building it fails with a
//! clear error so `protocols = ["mqtt"]` is never silently accepted).

use handler_api::{HandlerError, HandlerFactory};

/// The handler's factory, registered by the gateway as `mqtt`.
pub const FACTORY: HandlerFactory = HandlerFactory {
    name: "mqtt",
    build: |_| Err(HandlerError::Config("the mqtt handler is not implemented yet".into())),
};
