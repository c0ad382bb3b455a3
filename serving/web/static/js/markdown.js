// Markdown-lite for model cards: headings, lists, code blocks, paragraphs, `code`, **bold**,
// links shown as text. Built as DOM nodes (never innerHTML), so a card cannot inject markup.
// YAML front matter (--- ... ---) is shown as a code block.
import { h } from "./dom.js";

function inline(text) {
  const out = [];
  const re = /(`[^`]+`|\*\*[^*]+\*\*|\[[^\]]+\]\([^)]+\))/g;
  let last = 0;
  for (const m of text.matchAll(re)) {
    if (m.index > last) out.push(text.slice(last, m.index));
    const tok = m[0];
    if (tok.startsWith("`")) out.push(h("code", {}, tok.slice(1, -1)));
    else if (tok.startsWith("**")) out.push(h("strong", {}, tok.slice(2, -2)));
    else {
      const [, label, url] = tok.match(/\[([^\]]+)\]\(([^)]+)\)/);
      out.push(`${label} (${url})`); // not a live link: the page never leaves loopback
    }
    last = m.index + tok.length;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

export function renderMarkdown(src) {
  const root = h("div", { class: "md" });
  let lines = String(src || "").replace(/\r\n?/g, "\n").split("\n");
  if (lines[0] === "---") {
    const end = lines.indexOf("---", 1);
    if (end > 0) {
      root.append(h("pre", {}, lines.slice(1, end).join("\n")));
      lines = lines.slice(end + 1);
    }
  }
  let para = [];
  let list = null;
  const flush = () => {
    if (para.length) root.append(h("p", {}, inline(para.join(" "))));
    para = [];
    if (list) root.append(list);
    list = null;
  };
  for (let i = 0; i < lines.length; i += 1) {
    const line = lines[i];
    if (line.startsWith("```")) {
      flush();
      const body = [];
      for (i += 1; i < lines.length && !lines[i].startsWith("```"); i += 1) body.push(lines[i]);
      root.append(h("pre", {}, body.join("\n")));
      continue;
    }
    const head = line.match(/^(#{1,6})\s+(.*)$/);
    if (head) {
      flush();
      root.append(h(`h${Math.min(3, head[1].length)}`, {}, inline(head[2])));
      continue;
    }
    const item = line.match(/^\s*[-*+]\s+(.*)$/) || line.match(/^\s*\d+[.)]\s+(.*)$/);
    if (item) {
      if (para.length) { root.append(h("p", {}, inline(para.join(" ")))); para = []; }
      list = list || h("ul");
      list.append(h("li", {}, inline(item[1])));
      continue;
    }
    if (!line.trim()) { flush(); continue; }
    if (list) { root.append(list); list = null; }
    para.push(line.trim());
  }
  flush();
  return root;
}
