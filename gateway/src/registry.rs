//! The handlers compiled into this binary.

use handler_api::HandlerFactory;

/// Every compiled-in handler factory. `echo` is the test kit's line
/// protocol, useful to check a deployment's plumbing; it is off unless
/// listed in `protocols`.
pub fn compiled_in() -> Vec<HandlerFactory> {
    #[allow(unused_mut)]
    let mut v = vec![handler_api::testkit::ECHO_FACTORY];
    #[cfg(feature = "kafka")]
    v.push(handler_kafka::FACTORY);
    #[cfg(feature = "mqtt")]
    v.push(handler_mqtt::FACTORY);
    #[cfg(feature = "amqp")]
    v.push(handler_amqp::FACTORY);
    v
}

/// The factory of handler `name`.
pub fn find(name: &str) -> Option<HandlerFactory> {
    compiled_in().into_iter().find(|f| f.name == name)
}
