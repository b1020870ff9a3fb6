// A tool-call round trip with the official openai SDK: the model asks for a tool (streamed, so the tool-call
// deltas are assembled by the SDK's own helper), the caller answers with a `tool` message, the model answers.
// Prints one JSON line. Usage: OPENAI_BASE_URL=http://host:port/v1 OPENAI_API_KEY=key node tool_call.mjs MODEL
import OpenAI from "openai";

const [model] = process.argv.slice(2);
const client = new OpenAI({ maxRetries: 0 });
const tools = [
  {
    type: "function",
    function: {
      name: "get_weather",
      description: "The weather in a city",
      parameters: {
        type: "object",
        properties: { city: { type: "string" } },
        required: ["city"],
        additionalProperties: false,
      },
    },
  },
];
const messages = [{ role: "user", content: "Weather in Paris" }];
const runner = client.chat.completions.stream({ model, messages, tools });
const asked = await runner.finalChatCompletion();
const call = asked.choices[0].message.tool_calls[0];
messages.push(asked.choices[0].message);
messages.push({ role: "tool", tool_call_id: call.id, content: "sunny, 21 C" });
const answered = await client.chat.completions.create({ model, messages, tools });
console.log(
  JSON.stringify({
    finishReason: asked.choices[0].finish_reason,
    tool: call.function.name,
    arguments: JSON.parse(call.function.arguments),
    answer: answered.choices[0].message.content,
  }),
);
