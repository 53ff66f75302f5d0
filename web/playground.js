// The playground: asks /playground/info what the model serves, then calls the matching typed BentoML
// endpoint and draws its answer. Plain JS, no build step, no network beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "style") node.style.cssText = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
};
const fmt = (x) => x.toFixed(4);

// What each task shows: a hint, a default input, how to build the request and how to draw the answer.
const VIEWS = {
  text_embedding: {
    hint: "One sentence per line: the page shows their cosine similarity matrix.",
    input: "The cat sits on the mat.\nA cat is sitting on a rug.\nStock markets fell sharply today.",
    body: (text) => ({ texts: lines(text) }),
    render: (answer, body) => similarityMatrix(body.texts, answer.embeddings),
  },
  sequence_classification: {
    hint: "A text to classify: every label with its probability.",
    input: "This movie was a delight from start to finish.",
    body: (text) => ({ texts: [text.trim()] }),
    render: (answer) => bars(answer.results[0].map((r) => [r.label, r.score])),
  },
  token_classification: {
    hint: "A text: its entities are highlighted in place.",
    input: "Angela Merkel met Emmanuel Macron in Paris on Tuesday.",
    body: (text) => ({ texts: [text] }),
    render: (answer, body) => entities(body.texts[0], answer.results[0]),
  },
  fill_mask: {
    hint: "A text with the mask token: the best candidates for each mask.",
    input: (info) => `Paris is the ${info.mask_token || "[MASK]"} of France.`,
    body: (text) => ({ texts: [text.trim()], top_k: 5 }),
    render: (answer) => {
      const box = el("div");
      answer.results[0].forEach((mask, i) => {
        box.append(el("h2", {}, `mask ${i + 1}`));
        box.append(bars(mask.map((c) => [c.token_str, c.score])));
      });
      return box;
    },
  },
  rerank: {
    hint: "Documents, one per line; the query above. They come back most relevant first.",
    input: "Paris is the capital of France.\nBerlin is in Germany.\nThe Seine flows through Paris.",
    extra: () => el("input", { type: "text", id: "query", value: "What is the capital of France?" }),
    body: (text) => ({ query: $("query").value, documents: lines(text), return_documents: true }),
    render: (answer) => {
      const list = el("ol", { class: "ranked" });
      for (const r of answer.results) list.append(el("li", {}, `${r.document} `, el("span", { class: "num" }, fmt(r.score))));
      return list;
    },
  },
  text_generation: {
    hint: "Chat with the model: the reply streams in token by token.",
    input: "What is the capital of France?",
    stream: true,
    extra: samplingInputs,
    body: (text) => ({ messages: [...chat, { role: "user", content: text.trim() }], ...sampling() }),
  },
  text2text_generation: {
    hint: "A prompt: the output streams in as it is generated.",
    input: "translate English to German: The house is wonderful.",
    stream: true,
    extra: samplingInputs,
    body: (text) => ({ prompt: text.trim(), ...sampling() }),
  },
};

let info = null;
const chat = [];

function samplingInputs() {
  return el("div", { class: "row sampling" },
    el("label", {}, "max tokens ", el("input", { type: "number", id: "max-tokens", value: "64", min: "1" })),
    el("label", {}, "temperature ", el("input", { type: "number", id: "temperature", value: "0.7", min: "0", step: "0.1" })));
}

function sampling() {
  return { max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value) };
}

function lines(text) {
  return text.split("\n").map((s) => s.trim()).filter(Boolean);
}

function bars(pairs) {
  const box = el("div");
  for (const [label, score] of pairs) {
    const fill = el("div", { style: `width:${(100 * score).toFixed(1)}%` });
    box.append(el("div", { class: "bar-row" }, el("span", {}, label), el("div", { class: "bar" }, fill),
      el("span", { class: "num" }, fmt(score))));
  }
  return box;
}

function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) { dot += a[i] * b[i]; na += a[i] * a[i]; nb += b[i] * b[i]; }
  return dot / (Math.sqrt(na) * Math.sqrt(nb) || 1);
}

function similarityMatrix(texts, vectors) {
  const table = el("table", { class: "matrix", id: "matrix" });
  const head = el("tr", {}, el("th"));
  texts.forEach((_, j) => head.append(el("th", {}, `#${j + 1}`)));
  table.append(head);
  texts.forEach((text, i) => {
    const row = el("tr", {}, el("th", {}, `#${i + 1} ${text}`));
    vectors.forEach((_, j) => {
      const s = cosine(vectors[i], vectors[j]);
      const alpha = Math.max(0, s).toFixed(2);
      row.append(el("td", { style: `background: rgba(47,111,219,${alpha}); color: ${s > 0.6 ? "#fff" : "inherit"}` }, fmt(s)));
    });
    table.append(row);
  });
  return table;
}

function entities(text, found) {
  const palette = ["#ffe08a", "#b8e6c1", "#c9d7ff", "#ffc8c8", "#e3c8ff", "#c8f1ff"];
  const colour = {};
  const box = el("p", { id: "entities" });
  let at = 0;
  for (const e of found) {
    if (e.start < at) continue;
    box.append(text.slice(at, e.start));
    colour[e.entity_group] ??= palette[Object.keys(colour).length % palette.length];
    box.append(el("mark", { style: `background:${colour[e.entity_group]}`, title: `${e.entity_group} ${fmt(e.score)}` },
      text.slice(e.start, e.end), el("small", {}, e.entity_group)));
    at = e.end;
  }
  box.append(text.slice(at));
  if (!found.length) box.append(el("div", { class: "num" }, "(no entity found)"));
  return box;
}

function curlFor(path, body, stream) {
  const json = JSON.stringify(body).replaceAll("'", "'\\''");
  return `curl ${stream ? "-N " : ""}-X POST ${location.origin}${path} \\\n  -H 'Content-Type: application/json' \\\n  -d '${json}'`;
}

async function errorText(response) {
  const text = await response.text();
  try {
    const parsed = JSON.parse(text);
    const item = Array.isArray(parsed) ? parsed[0] : parsed;
    return item.error?.message || item.error || item.detail || text;
  } catch { return text; }
}

function showChat(pending) {
  const box = el("div", { id: "conversation" });
  for (const message of chat) box.append(el("div", { class: `msg ${message.role}` }, el("span", { class: "who" }, message.role), message.content));
  if (pending) box.append(pending);
  $("result").replaceChildren(box);
}

async function send() {
  const view = VIEWS[info.task];
  const text = $("input").value;
  const body = view.body(text);
  $("curl").textContent = curlFor(info.endpoint_path, body, view.stream);
  $("send").disabled = true;
  $("status").className = "";
  $("status").textContent = "running…";
  const started = performance.now();
  try {
    const response = await fetch(info.endpoint_path, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (!response.ok) throw new Error(`${response.status}: ${await errorText(response)}`);
    if (view.stream) {
      await streamReply(response, body);
    } else {
      $("result").replaceChildren(view.render(await response.json(), body));
    }
    $("status").textContent = `done in ${Math.round(performance.now() - started)} ms`;
    $("result").dataset.done = "1";
  } catch (error) {
    $("status").className = "error";
    $("status").textContent = String(error.message || error);
  } finally {
    $("send").disabled = false;
  }
}

async function streamReply(response, body) {
  const reply = el("span", { id: "reply" });
  const bubble = el("div", { class: "msg assistant" }, el("span", { class: "who" }, "assistant"), reply);
  if (info.endpoint === "chat") {
    chat.push(body.messages[body.messages.length - 1]);
    $("input").value = "";
    showChat(bubble);
  } else {
    $("result").replaceChildren(bubble);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    text += decoder.decode(value, { stream: true });
    reply.textContent = text;
  }
  if (info.endpoint === "chat") chat.push({ role: "assistant", content: text });
}

async function copyCurl() {
  const text = $("curl").textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const range = document.createRange();
    range.selectNodeContents($("curl"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    document.execCommand("copy");
  }
  $("copy").textContent = "Copied";
  setTimeout(() => ($("copy").textContent = "Copy"), 1200);
}

async function start() {
  info = await (await fetch("/playground/info")).json();
  $("model").textContent = info.model;
  $("task").textContent = info.task;
  $("backend").textContent = info.backend ? `· backend ${info.backend}` : "";
  $("ready").textContent = info.ready ? "· ready" : "· loading";
  $("ready").className = info.ready ? "ok" : "wait";
  for (const route of info.routes) $("routes").append(el("li", {}, el("code", {}, route)));
  const view = VIEWS[info.task];
  if (!view) {
    $("hint").textContent = `No playground view for task ${info.task}.`;
    return;
  }
  $("hint").textContent = view.hint;
  $("input").value = typeof view.input === "function" ? view.input(info) : view.input;
  if (view.extra) $("extra").append(view.extra());
  $("send").disabled = false;
  $("send").addEventListener("click", send);
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) send();
  });
  $("copy").addEventListener("click", copyCurl);
  document.body.dataset.task = info.task;
}

start();
