// Streams one chat to the end with the official openai SDK; prints what it read as one JSON line.
// Usage: OPENAI_BASE_URL=http://host:port/v1 OPENAI_API_KEY=key node stream.mjs MODEL PROMPT
import OpenAI from "openai";

const [model, prompt] = process.argv.slice(2);
const client = new OpenAI({ maxRetries: 0 });
const stream = await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: prompt }],
  stream: true,
  stream_options: { include_usage: true },
});
let content = "";
let chunks = 0;
let finishReason = null;
let usage = null;
for await (const chunk of stream) {
  chunks += 1;
  for (const choice of chunk.choices) {
    content += choice.delta.content ?? "";
    finishReason = choice.finish_reason ?? finishReason;
  }
  usage = chunk.usage ?? usage;
}
console.log(JSON.stringify({ content, chunks, finishReason, usage }));
