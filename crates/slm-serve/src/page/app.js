// The chat page. Model output only ever reaches the document through textContent and
// createElement (renderMarkdown below): never innerHTML, so no reply can become markup.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];
let controller = null;

const keyInput = $("apikey");
keyInput.value = localStorage.getItem("slm-api-key") || "";
keyInput.addEventListener("change", () => {
  localStorage.setItem("slm-api-key", keyInput.value);
  loadModels();
});

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

async function loadModels() {
  const select = $("model");
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    select.replaceChildren();
    for (const m of body.data) {
      if (m.kind && m.kind !== "chat") continue;
      const o = document.createElement("option");
      o.value = m.id;
      o.textContent = m.id;
      select.appendChild(o);
    }
  } catch (e) {
    addMessage("error", "Could not list the models: " + e.message);
  }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  if (role === "assistant") renderMarkdown(div, text);
  else div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

// Inline markdown: `code`, **bold**, *italic*, [text](http...) links. Builds nodes only.
function inline(parent, text) {
  const re = /(`[^`]+`)|(\*\*[^*]+\*\*)|(\*[^*\s][^*]*\*)|(\[[^\]]+\]\((https?:\/\/[^)\s]+)\))/;
  while (text.length) {
    const m = re.exec(text);
    if (!m) { parent.appendChild(document.createTextNode(text)); break; }
    if (m.index > 0) parent.appendChild(document.createTextNode(text.slice(0, m.index)));
    const tok = m[0];
    let el;
    if (m[1]) { el = document.createElement("code"); el.textContent = tok.slice(1, -1); }
    else if (m[2]) { el = document.createElement("strong"); el.textContent = tok.slice(2, -2); }
    else if (m[3]) { el = document.createElement("em"); el.textContent = tok.slice(1, -1); }
    else {
      el = document.createElement("a");
      el.textContent = tok.slice(1, tok.indexOf("]"));
      el.href = m[5];
      el.rel = "noopener noreferrer nofollow";
      el.target = "_blank";
    }
    parent.appendChild(el);
    text = text.slice(m.index + tok.length);
  }
}

// Block markdown: fenced code, headings, lists, paragraphs.
function renderMarkdown(target, text) {
  target.replaceChildren();
  const lines = text.split("\n");
  let i = 0, list = null, para = null;
  const close = () => { list = null; para = null; };
  while (i < lines.length) {
    const line = lines[i];
    if (line.startsWith("```")) {
      close();
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      const body = [];
      i++;
      while (i < lines.length && !lines[i].startsWith("```")) body.push(lines[i++]);
      code.textContent = body.join("\n");
      pre.appendChild(code);
      target.appendChild(pre);
      i++;
      continue;
    }
    const h = /^(#{1,6})\s+(.*)$/.exec(line);
    const li = /^\s*(?:[-*+]|\d+[.)])\s+(.*)$/.exec(line);
    if (h) {
      close();
      const el = document.createElement("h" + Math.min(6, h[1].length + 2));
      inline(el, h[2]);
      target.appendChild(el);
    } else if (li) {
      para = null;
      if (!list) { list = document.createElement(/^\s*\d/.test(line) ? "ol" : "ul"); target.appendChild(list); }
      const item = document.createElement("li");
      inline(item, li[1]);
      list.appendChild(item);
    } else if (line.trim() === "") {
      close();
    } else {
      list = null;
      if (!para) { para = document.createElement("p"); target.appendChild(para); }
      else para.appendChild(document.createElement("br"));
      inline(para, line);
    }
    i++;
  }
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

async function send() {
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  addMessage("user", text);
  history.push({ role: "user", content: text });
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const div = addMessage("assistant", "");
  const stats = document.createElement("div");
  stats.className = "stats";
  let reply = "", first = 0, usage = null;
  const start = performance.now();
  controller = new AbortController();
  busy(true);
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({
        model: $("model").value || undefined,
        messages,
        temperature: Number($("temperature").value),
        stream: true,
        stream_options: { include_usage: true },
      }),
      signal: controller.signal,
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : r.statusText);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          if (!first) first = performance.now();
          reply += delta.content;
          renderMarkdown(div, reply);
          div.appendChild(stats);
          div.scrollIntoView({ block: "end" });
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") addMessage("error", e.message);
  } finally {
    const end = performance.now();
    const n = usage ? usage.completion_tokens : null;
    const secs = first ? (end - first) / 1000 : 0;
    stats.textContent = controller.signal.aborted ? "stopped" : "";
    if (n !== null && secs > 0) {
      stats.textContent = `${n} tokens, ${(n / secs).toFixed(1)} tokens/s, first token after ${((first - start) / 1000).toFixed(2)} s`;
    }
    renderMarkdown(div, reply);
    div.appendChild(stats);
    history.push({ role: "assistant", content: reply });
    controller = null;
    busy(false);
  }
}

$("send").addEventListener("click", send);
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
});
$("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("messages").replaceChildren();
});
loadModels();
