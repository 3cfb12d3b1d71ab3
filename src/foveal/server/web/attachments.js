// Images waiting to be sent: from the file picker, drag and drop, or paste. Each becomes
// {name, url, base64}: `url` a blob: URL for the thumbnail, `base64` the plain standard base64
// that /api/chat takes in a message's `images` (no data: prefix).

function readBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => {
      const url = String(reader.result);
      resolve(url.slice(url.indexOf(",") + 1));
    };
    reader.onerror = () => reject(new Error(`cannot read ${file.name || "the file"}`));
    reader.readAsDataURL(file);
  });
}

// A file the browser names as some other type (text, PDF, ...) is refused here; a file with an
// image type or none goes to the server, which decodes it and says what is wrong with it.
export function looksLikeImage(file) {
  return !file.type || file.type.startsWith("image/");
}

export class Attachments {
  constructor(container, onError) {
    this.container = container;
    this.onError = onError;
    this.items = [];
  }

  async add(files) {
    for (const file of files) {
      if (!looksLikeImage(file)) {
        this.onError(`${file.name || "that file"} is not an image (${file.type})`);
        continue;
      }
      try {
        const base64 = await readBase64(file);
        this.items.push({ name: file.name || "pasted image", url: URL.createObjectURL(file), base64 });
      } catch (e) {
        this.onError(e.message);
      }
    }
    this.render();
  }

  // Hand the images over to a message (their blob: URLs now belong to its thumbnails).
  take() {
    const items = this.items;
    this.items = [];
    this.render();
    return items;
  }

  clear() {
    for (const item of this.items) URL.revokeObjectURL(item.url);
    this.items = [];
    this.render();
  }

  render() {
    this.container.replaceChildren(...this.items.map((item, i) => {
      const figure = document.createElement("figure");
      figure.className = "thumb";
      const img = document.createElement("img");
      img.src = item.url;
      img.alt = item.name;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "remove";
      remove.textContent = "\u00d7";
      remove.title = `Remove ${item.name}`;
      remove.setAttribute("aria-label", `Remove ${item.name}`);
      remove.addEventListener("click", () => {
        URL.revokeObjectURL(item.url);
        this.items.splice(i, 1);
        this.render();
      });
      figure.append(img, remove);
      return figure;
    }));
    this.container.hidden = this.items.length === 0;
  }
}

// Drag and drop anywhere on the page, and paste (an image copied from elsewhere, or a screenshot).
export function watchDropAndPaste(target, hint, attachments) {
  let depth = 0;
  const hasFiles = (e) => Array.from(e.dataTransfer?.types || []).includes("Files");
  target.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    depth += 1;
    hint.hidden = false;
  });
  target.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (depth === 0) hint.hidden = true;
  });
  target.addEventListener("dragover", (e) => {
    if (hasFiles(e)) e.preventDefault();
  });
  target.addEventListener("drop", (e) => {
    depth = 0;
    hint.hidden = true;
    if (!e.dataTransfer?.files?.length) return;
    e.preventDefault();
    attachments.add(Array.from(e.dataTransfer.files));
  });
  target.addEventListener("paste", (e) => {
    const files = Array.from(e.clipboardData?.items || [])
      .filter((item) => item.kind === "file" && item.type.startsWith("image/"))
      .map((item) => item.getAsFile())
      .filter(Boolean);
    if (files.length) {
      e.preventDefault();
      attachments.add(files);
    }
  });
}
