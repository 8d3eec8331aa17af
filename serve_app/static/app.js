// The chat page: a plain OpenAI-style client of this server (GET v1/models, POST v1/chat/completions with
// stream: true), reading the server-sent events through fetch + ReadableStream.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), temperature: $("temperature"), maxTokens: $("max-tokens"), newChat: $("new-chat"),
  messages: $("messages"), empty: $("empty"), composer: $("composer"), prompt: $("prompt"),
  send: $("send"), stop: $("stop"), status: $("status"),
  keyDialog: $("key-dialog"), keyMessage: $("key-message"), apiKey: $("api-key"),
};

// The API key, when the server wants one: asked for on the first 401, then kept for this tab (and its reloads)
// only, and sent as `Authorization: Bearer` on every request.
const KEY_STORAGE = "glm-serve.api-key";
let keyPrompt = null; // the open key dialog: requests refused at the same time all wait for the same answer

// Finished exchanges only, as the server wants them: [{role, content}, ...]. A turn that failed before any
// text arrived is left out, so the next request never carries a question without its answer.
let history = [];
let inFlight = null; // the AbortController of the reply being streamed
let conversation = 0; // bumped by "New chat", so that a reply stopped by it is not saved into the new one

// Resolves to the key typed in, or "" if the user cancelled.
function askForKey(message) {
  keyPrompt ??= new Promise((resolve) => {
    ui.keyMessage.textContent = message;
    ui.apiKey.value = "";
    ui.keyDialog.returnValue = "";
    ui.keyDialog.addEventListener(
      "close",
      () => {
        keyPrompt = null;
        resolve(ui.keyDialog.returnValue === "ok" ? ui.apiKey.value.trim() : "");
      },
      { once: true },
    );
    ui.keyDialog.showModal();
  });
  return keyPrompt;
}

// fetch with the key; a 401 asks for a key (again, if the one sent was refused) and sends the request again.
async function apiFetch(url, init = {}) {
  for (;;) {
    const key = sessionStorage.getItem(KEY_STORAGE);
    const headers = new Headers(init.headers);
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(url, { ...init, headers });
    if (response.status !== 401) return response;
    sessionStorage.removeItem(KEY_STORAGE);
    const entered = await askForKey(
      key ? "That key was refused. Enter another one." : "This server needs an API key.",
    );
    if (!entered) return response; // cancelled: the caller shows the server's 401 message
    sessionStorage.setItem(KEY_STORAGE, entered);
  }
}

async function loadModels() {
  try {
    const response = await apiFetch("v1/models");
    if (!response.ok) throw new Error(`GET /v1/models answered ${response.status}`);
    const { data } = await response.json();
    // The server lists chat models first, the default one first of all: selecting option 0 picks it.
    for (const card of data) ui.model.append(new Option(card.id, card.id));
  } catch (err) {
    ui.status.textContent = `Could not list the models: ${err.message}`;
  }
}

function addBubble(role, label) {
  ui.empty.hidden = true;
  const bubble = document.createElement("article");
  bubble.className = `message ${role}`;
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = label;
  const body = document.createElement("div");
  body.className = "body";
  bubble.append(meta, body);
  ui.messages.append(bubble);
  scrollToEnd(true);
  return body;
}

// Follows the reply as it grows, unless the user scrolled up to read something earlier.
function scrollToEnd(force) {
  const box = ui.messages;
  if (force || box.scrollHeight - box.scrollTop - box.clientHeight < 80) box.scrollTop = box.scrollHeight;
}

function showNote(body, text, kind) {
  const note = document.createElement("div");
  note.className = `note ${kind}`;
  note.textContent = text; // server text too is shown as text, never as markup
  body.parentElement.append(note); // after the reply and any earlier note, in the order they came
}

// Only the numbers the user filled in are sent; the server validates them and says what is wrong.
function samplingParams() {
  const params = {};
  if (!Number.isNaN(ui.temperature.valueAsNumber)) params.temperature = ui.temperature.valueAsNumber;
  if (!Number.isNaN(ui.maxTokens.valueAsNumber)) params.max_tokens = ui.maxTokens.valueAsNumber;
  return params;
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.prompt.disabled = busy;
  document.body.classList.toggle("busy", busy);
  if (!busy) ui.prompt.focus();
}

// Yields the parsed JSON of each `data:` event until `data: [DONE]`. Events end with a blank line; a network
// read may end mid-event, so the unfinished tail waits in `buffer` for the next read.
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = events.pop();
    for (const event of events) {
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message || JSON.stringify(body.detail ?? body);
  } catch {
    return `the server answered ${response.status}`;
  }
}

async function sendMessage(text) {
  const model = ui.model.value;
  addBubble("user", "You").textContent = text; // the user's own text is shown as typed
  const body = addBubble("assistant", model);
  const messages = [...history, { role: "user", content: text }];
  let reply = "";
  let frame = 0;
  // Re-rendering the whole reply on every delta is cheap, but once per animation frame is enough.
  const render = () => {
    frame = 0;
    body.innerHTML = window.renderMarkdown(reply); // safe: renderMarkdown escapes all of the model's text
    scrollToEnd(false);
  };
  const turn = conversation;

  inFlight = new AbortController();
  setBusy(true);
  try {
    const response = await apiFetch("v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages, stream: true, ...samplingParams() }),
      signal: inFlight.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const event of sseEvents(response)) {
      // A failure after the stream started arrives as an event, since the status code was already sent.
      if (event.error) throw new Error(event.error.message);
      const choice = event.choices?.[0];
      if (choice?.delta?.content) {
        reply += choice.delta.content;
        frame = frame || requestAnimationFrame(render);
      }
      if (choice?.finish_reason === "length") showNote(body, "Reached the max tokens limit.", "info");
    }
  } catch (err) {
    if (err.name === "AbortError") showNote(body, "Stopped.", "stopped");
    else showNote(body, `Error: ${err.message}`, "error");
  } finally {
    cancelAnimationFrame(frame);
    render();
    // A stopped reply is kept as far as it went: it is what the user saw.
    if (reply && turn === conversation) history = [...messages, { role: "assistant", content: reply }];
    inFlight = null;
    setBusy(false);
  }
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || inFlight) return;
  ui.prompt.value = "";
  sendMessage(text);
});

// Enter sends, Shift+Enter starts a new line (IME composition keeps its own Enter).
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});

ui.stop.addEventListener("click", () => inFlight?.abort());

ui.newChat.addEventListener("click", () => {
  inFlight?.abort();
  conversation += 1;
  history = [];
  ui.messages.replaceChildren(ui.empty);
  ui.empty.hidden = false;
  ui.status.textContent = "";
});

loadModels();
