// MQTT.js subscriber for test_clients.py: says it accepts `max` topic
// aliases, subscribes to `filter` and prints "topic payload" for `count`
// messages, then exits (exit code 1 on an error or after 15 s).
// Usage: node alias-sub.js PORT FILTER COUNT MAX
const mqtt = require("mqtt");
const [port, filter, count, max] = process.argv.slice(2);
const c = mqtt.connect(`mqtt://127.0.0.1:${port}`, {
  protocolVersion: 5,
  reconnectPeriod: 0,
  properties: { topicAliasMaximum: Number(max) },
});
let got = 0;
const fail = (why) => {
  console.error(String(why));
  process.exit(1);
};
setTimeout(() => fail("timeout"), 15000);
c.on("error", fail);
c.on("connect", () =>
  c.subscribe(filter, { qos: 1 }, (err) => {
    if (err) fail(err);
    else console.log("subscribed");
  }),
);
c.on("message", (topic, payload) => {
  console.log(`${topic} ${payload}`);
  if (++got === Number(count)) c.end(false, () => process.exit(0));
});
