//! AMQP 0-9-1 <-> core mapping. (Owned by the AMQP handler's work.)
