// One realtime session with the official `openai` Node SDK (its OpenAIRealtimeWS transport),
// pointed at meshrt: node realtime_session.js BASE_URL KEY MODEL. Prints one JSON line: the
// usage of its response, or the error. The SDK dials wss:// for an https:// base URL; trust a
// test CA with NODE_EXTRA_CA_CERTS. Run by tests/test_fleet.py.
const OpenAI = require("openai");
const { OpenAIRealtimeWS } = require("openai/realtime/ws");

const [baseURL, apiKey, model] = process.argv.slice(2);
const client = new OpenAI({ apiKey, baseURL, maxRetries: 0 });
const rt = new OpenAIRealtimeWS({ model }, client);
const deadline = setTimeout(() => finish({ error: "no response.done within 20 s" }, 1), 20000);

function finish(result, code) {
  clearTimeout(deadline);
  console.log(JSON.stringify(result));
  try {
    rt.close();
  } catch (e) {}
  process.exitCode = code;
}

rt.socket.on("open", () => {
  rt.send({ type: "session.update", session: { type: "realtime", output_modalities: ["text"] } });
  rt.send({ type: "response.create" });
});
rt.on("response.done", (event) => finish({ usage: event.response.usage }, 0));
rt.on("error", (err) => finish({ error: String(err && err.message ? err.message : err) }, 1));
rt.socket.on("unexpected-response", (_req, res) => finish({ error: `HTTP ${res.statusCode}` }, 1));
