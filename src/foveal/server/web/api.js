// Talking to foveal's public API from the page: same origin only, the API key (when the server has
// one) as a Bearer header, errors as the server's own message, /api/chat's NDJSON stream as objects.

const KEY_NAME = "foveal.apiKey";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_NAME) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_NAME, key);
  else sessionStorage.removeItem(KEY_NAME);
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// The message in an error body: Ollama's {"error": "..."} or OpenAI's {"error": {"message": ...}}.
export function errorMessage(body) {
  if (body && typeof body === "object") {
    const e = body.error;
    if (typeof e === "string") return e;
    if (e && typeof e.message === "string") return e.message;
  }
  return "";
}

async function failure(response) {
  const text = await response.text().catch(() => "");
  let message = "";
  try {
    message = errorMessage(JSON.parse(text));
  } catch {
    message = text.trim().slice(0, 300);
  }
  const reason = response.statusText ? ` ${response.statusText}` : "";
  return new ApiError(response.status, message || `the server answered HTTP ${response.status}${reason}`);
}

async function call(method, path, body, signal) {
  let response;
  try {
    response = await fetch(path, {
      method, signal, headers: headers(body !== undefined), cache: "no-store", credentials: "omit",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, `cannot reach the server (${e.message})`);
  }
  if (!response.ok) throw await failure(response);
  return response;
}

export async function listModels() {
  const response = await call("GET", "/api/tags");
  const body = await response.json();
  return (body.models || []).map((m) => m.name);
}

// POST /api/chat with stream: true; yields each NDJSON object. An error after streaming began
// arrives as one last {"error": ...} line and is thrown as an ApiError.
export async function* chat(request, signal) {
  const response = await call("POST", "/api/chat", { ...request, stream: true }, signal);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).trim();
      buffer = buffer.slice(newline + 1);
      if (line) yield parseLine(line);
    }
    if (done) break;
  }
  if (buffer.trim()) yield parseLine(buffer.trim());
}

function parseLine(line) {
  let obj;
  try {
    obj = JSON.parse(line);
  } catch {
    throw new ApiError(0, `the server sent a line that is not JSON: ${line.slice(0, 120)}`);
  }
  const message = errorMessage(obj);
  if (message) throw new ApiError(0, message);
  return obj;
}
