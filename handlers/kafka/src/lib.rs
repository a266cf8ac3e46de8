//! The kafka protocol handler (not implemented yet: building it fails with a
//! clear error so `protocols = ["kafka"]` is never silently accepted).

use handler_api::{HandlerError, HandlerFactory};

/// The handler's factory, registered by the gateway as `kafka`.
pub const FACTORY: HandlerFactory = HandlerFactory {
    name: "kafka",
    build: |_| Err(HandlerError::Config("the kafka handler is not implemented yet".into())),
};
