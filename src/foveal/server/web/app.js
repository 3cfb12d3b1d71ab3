// The chat page: wires the form to /api/chat. The conversation lives in this page only (a reload or
// "New chat" starts afresh); every request sends the whole history, images included, as Ollama
// clients do.

import { ApiError, apiKey, chat, listModels, setApiKey } from "./api.js";
import { Attachments, watchDropAndPaste } from "./attachments.js";
import { AssistantMessage, userMessage } from "./messages.js";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), newChat: $("new-chat"), log: $("log"), empty: $("empty"), composer: $("composer"),
  prompt: $("prompt"), file: $("file"), send: $("send"), stop: $("stop"), status: $("status"),
  attachments: $("attachments"), dropHint: $("drop-hint"), keyDialog: $("key-dialog"), keyForm: $("key-form"),
  key: $("key"), keyError: $("key-error"), keyCancel: $("key-cancel"), temperature: $("temperature"),
  topP: $("top-p"), maxTokens: $("max-tokens"), seed: $("seed"), think: $("think"), system: $("system"),
  format: $("format"),
};
const MODEL_NAME = "foveal.model";

const state = { history: [], controller: null, keyPrompt: null };
const attachments = new Attachments(ui.attachments, (message) => say(message, true));

function say(message, isError = false) {
  ui.status.textContent = message;
  ui.status.classList.toggle("error", isError);
}

// ---- the API key -------------------------------------------------------------------------
function askForKey(refused) {
  if (state.keyPrompt) return state.keyPrompt;
  state.keyPrompt = new Promise((resolve) => {
    ui.keyError.textContent = refused ? "The server refused that key." : "";
    ui.key.value = "";
    const done = (ok) => {
      ui.keyForm.removeEventListener("submit", onSubmit);
      ui.keyCancel.removeEventListener("click", onCancel);
      ui.keyDialog.removeEventListener("cancel", onCancel);
      ui.keyDialog.close();
      state.keyPrompt = null;
      resolve(ok);
    };
    const onSubmit = (e) => {
      e.preventDefault();
      setApiKey(ui.key.value.trim());
      done(true);
    };
    const onCancel = (e) => {
      e.preventDefault();
      done(false);
    };
    ui.keyForm.addEventListener("submit", onSubmit);
    ui.keyCancel.addEventListener("click", onCancel);
    ui.keyDialog.addEventListener("cancel", onCancel);
    ui.keyDialog.showModal();
    ui.key.focus();
  });
  return state.keyPrompt;
}

// Run `action`; on a 401 ask for the key (again) and retry, until it passes or the user gives up.
async function withKey(action) {
  for (;;) {
    try {
      return await action();
    } catch (e) {
      if (!(e instanceof ApiError) || e.status !== 401) throw e;
      if (!(await askForKey(Boolean(apiKey())))) throw new ApiError(401, "this server needs an API key");
    }
  }
}

// ---- models ------------------------------------------------------------------------------
async function loadModels() {
  try {
    const names = await withKey(listModels);
    const wanted = sessionStorage.getItem(MODEL_NAME);
    ui.model.replaceChildren(...names.map((name) => new Option(name, name, false, name === wanted)));
    if (!names.length) say("This server serves no models.", true);
    else say("");
  } catch (e) {
    say(`Cannot list the models: ${e.message}`, true);
  }
}

// ---- settings ----------------------------------------------------------------------------
function number(input, label, integer) {
  const raw = input.value.trim();
  if (raw === "") {
    if (input.validity.badInput) throw new Error(`${label} is not a number`);
    return undefined;
  }
  const n = Number(raw);
  if (!Number.isFinite(n) || (integer && !Number.isInteger(n))) {
    throw new Error(`${label} must be ${integer ? "a whole number" : "a number"}, got ${raw}`);
  }
  return n;
}

function options() {
  const out = {
    temperature: number(ui.temperature, "Temperature"),
    top_p: number(ui.topP, "Top p"),
    num_predict: number(ui.maxTokens, "Max tokens", true),
    seed: number(ui.seed, "Seed", true),
  };
  return Object.fromEntries(Object.entries(out).filter(([, v]) => v !== undefined));
}

function answerFormat() {
  const raw = ui.format.value.trim();
  if (!raw) return undefined;
  if (raw === "json") return "json";
  let schema;
  try {
    schema = JSON.parse(raw);
  } catch (e) {
    throw new Error(`The answer format is not valid JSON (${e.message}); write "json" or a JSON schema object`);
  }
  if (!schema || typeof schema !== "object" || Array.isArray(schema)) {
    throw new Error('The answer format must be "json" or a JSON schema object');
  }
  return schema;
}

// ---- one turn ----------------------------------------------------------------------------
function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  ui.composer.classList.toggle("busy", busy);
}

function scrollDown(force) {
  const log = ui.log;
  if (force || log.scrollHeight - log.scrollTop - log.clientHeight < 120) log.scrollTop = log.scrollHeight;
}

function leftOut(article, why) {
  article.classList.add("left-out");
  article.title = why;
}

async function send() {
  if (state.controller) return;
  const text = ui.prompt.value.trim();
  if (!text && !attachments.items.length) return;
  const model = ui.model.value;
  if (!model) {
    say("No model to chat with: the server lists none.", true);
    return;
  }
  let request;
  try {
    request = { model, options: options(), think: ui.think.checked };
    const format = answerFormat();
    if (format !== undefined) request.format = format;
  } catch (e) {
    say(e.message, true);
    return;
  }
  say("");
  sessionStorage.setItem(MODEL_NAME, model);
  const images = attachments.take();
  ui.prompt.value = "";
  resize();
  ui.empty.hidden = true;
  const question = userMessage(ui.log, text, images);
  const reply = new AssistantMessage(ui.log, model);
  scrollDown(true);
  const turn = { role: "user", content: text };
  if (images.length) turn.images = images.map((image) => image.base64);
  state.history.push(turn);
  const system = ui.system.value.trim();
  request.messages = [...(system ? [{ role: "system", content: system }] : []), ...state.history];

  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  let final = null;
  try {
    await withKey(async () => {
      for await (const piece of chat(request, controller.signal)) {
        reply.add(piece.message || {});
        if (piece.done) final = piece;
        scrollDown(false);
      }
    });
    if (!final) throw new ApiError(0, "the answer ended before its last line (the server may have stopped)");
    reply.finish(final);
    state.history.push({ role: "assistant", content: reply.content });
  } catch (e) {
    if (e.name === "AbortError") {
      reply.stopped();
      say("Stopped.");
      if (reply.content) {
        state.history.push({ role: "assistant", content: reply.content });
      } else {
        state.history.pop();
        leftOut(question, "stopped before an answer: not part of the conversation");
      }
    } else {
      reply.failed(e.message);
      state.history.pop();
      leftOut(question, "failed: not part of the conversation");
    }
  } finally {
    state.controller = null;
    setBusy(false);
    scrollDown(false);
    ui.prompt.focus();
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

function newChat() {
  stop();
  state.history = [];
  for (const img of ui.log.querySelectorAll("img")) URL.revokeObjectURL(img.src);
  ui.log.replaceChildren(ui.empty);
  ui.empty.hidden = false;
  attachments.clear();
  ui.prompt.value = "";
  resize();
  say("");
  ui.prompt.focus();
}

function resize() {
  ui.prompt.style.height = "auto";
  ui.prompt.style.height = `${ui.prompt.scrollHeight}px`;
}

// ---- wiring ------------------------------------------------------------------------------
ui.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
document.getElementById("settings-form").addEventListener("submit", (e) => e.preventDefault());
ui.prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
ui.prompt.addEventListener("input", resize);
ui.stop.addEventListener("click", stop);
ui.newChat.addEventListener("click", newChat);
ui.model.addEventListener("change", () => sessionStorage.setItem(MODEL_NAME, ui.model.value));
ui.file.addEventListener("change", () => {
  attachments.add(Array.from(ui.file.files));
  ui.file.value = "";
});
watchDropAndPaste(document, ui.dropHint, attachments);
attachments.render();
loadModels();
