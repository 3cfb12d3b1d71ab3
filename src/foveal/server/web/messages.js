// The chat history on screen. Text from the user or the model only ever goes in through
// textContent, never as HTML.

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function userMessage(log, text, images) {
  const article = el("article", "msg user");
  article.append(el("h3", "who", "You"));
  if (images.length) {
    const strip = el("div", "images");
    for (const image of images) {
      const img = el("img", "thumb-img");
      img.src = image.url;
      img.alt = image.name;
      img.title = image.name;
      strip.append(img);
    }
    article.append(strip);
  }
  if (text) article.append(el("div", "text", text));
  log.append(article);
  return article;
}

function duration(ns) {
  const ms = ns / 1e6;
  if (ms < 1) return `${ms.toFixed(2)} ms`;
  if (ms < 1000) return `${ms.toFixed(1)} ms`;
  return `${(ms / 1000).toFixed(2)} s`;
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

// The final object of /api/chat -> [key, label] pairs; the keys are data-stat attributes.
export function statsOf(final) {
  const out = [];
  const add = (key, text) => out.push([key, text]);
  const cached = final.prompt_cached_count ? ` (${final.prompt_cached_count} cached)` : "";
  add("prompt_tokens", `${plural(final.prompt_eval_count ?? 0, "prompt token")}${cached}`);
  if (final.image_count) {
    add("images", `${plural(final.image_count, "image")} = ${plural(final.image_token_count ?? 0, "image token")}`);
  }
  add("generated_tokens", `${plural(final.eval_count ?? 0, "generated token")}`);
  if (final.load_duration > 1e6) add("load", `load ${duration(final.load_duration)}`);
  add("preprocess", `preprocess ${duration(final.preprocess_duration ?? 0)}`);
  if (final.image_count) add("vision_encode", `vision encode ${duration(final.vision_encode_duration ?? 0)}`);
  add("prefill", `prefill ${duration(final.prompt_eval_duration ?? 0)}`);
  const decodeS = (final.eval_duration ?? 0) / 1e9;
  const rate = decodeS > 0 ? (final.eval_count / decodeS).toFixed(1) : "-";
  add("decode", `decode ${duration(final.eval_duration ?? 0)} (${rate} tok/s)`);
  add("total", `total ${duration(final.total_duration ?? 0)}`);
  add("done_reason", final.done_reason === "length" ? "stopped at max tokens" : `done: ${final.done_reason}`);
  return out;
}

export class AssistantMessage {
  constructor(log, model) {
    this.article = el("article", "msg assistant pending");
    this.article.append(el("h3", "who", model));
    this.thought = el("details", "thought");
    this.thought.hidden = true;
    this.thought.open = true;
    this.thought.append(el("summary", "", "Thinking"));
    this.thoughtText = el("div", "thought-text");
    this.thought.append(this.thoughtText);
    this.text = el("div", "text");
    this.stats = el("ul", "stats");
    this.stats.hidden = true;
    this.error = el("p", "error");
    this.error.setAttribute("role", "alert");
    this.error.hidden = true;
    this.article.append(this.thought, this.text, this.error, this.stats);
    log.append(this.article);
    this.content = "";
    this.thinking = "";
  }

  add(piece) {
    if (piece.thinking) {
      this.thinking += piece.thinking;
      this.thoughtText.textContent = this.thinking;
      this.thought.hidden = false;
    }
    if (piece.content) {
      if (!this.content && this.thinking) this.thought.open = false;   // the answer began: fold the thought
      this.content += piece.content;
      this.text.textContent = this.content;
    }
  }

  finish(final) {
    this.article.classList.remove("pending");
    this.thought.querySelector("summary").textContent = "Thought";
    this.stats.replaceChildren(...statsOf(final).map(([key, text]) => {
      const li = el("li", "", text);
      li.dataset.stat = key;
      return li;
    }));
    this.stats.hidden = false;
  }

  stopped() {
    this.article.classList.remove("pending");
    this.article.classList.add("stopped");
    this.thought.querySelector("summary").textContent = "Thought";
    this.stats.replaceChildren(el("li", "", "stopped"));
    this.stats.firstChild.dataset.stat = "stopped";
    this.stats.hidden = false;
  }

  failed(message) {
    this.article.classList.remove("pending");
    this.article.classList.add("failed");
    this.error.textContent = message;
    this.error.hidden = false;
  }
}
