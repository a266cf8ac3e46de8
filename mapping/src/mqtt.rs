//! MQTT <-> core mapping. (Owned by the MQTT handler's work.)
