// A small, safe Markdown subset for model replies: fenced code, inline code, bold, italic, headings,
// lists, paragraphs and http(s) links.
//
// Safety comes from the order: ALL of the model's text is HTML-escaped first, and only then are the few tags
// below added around it. No tag or attribute the model writes can reach the DOM as markup, and a link's
// address must start with http:// or https:// (so no javascript: URLs); its quotes are already escaped.
"use strict";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

function renderEmphasis(html) {
  return html
    .replace(/\*\*(?=\S)(.+?)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*\w])\*(?=\S)([^*]+?)\*(?!\w)/g, "$1<em>$2</em>")
    .replace(/(^|[^\w])_(?=\S)([^_]+?)_(?!\w)/g, "$1<em>$2</em>");
}

// Inline markup on one escaped line. Code spans and links are set aside first (as numbered placeholders), so
// that `*x*` inside code stays literal and no emphasis tag lands inside a link's address.
function renderInline(line) {
  const stash = [];
  const put = (html) => `\u0000${stash.push(html) - 1}\u0000`;
  let html = line.replace(/`([^`]+)`/g, (_, code) => put(`<code>${code}</code>`));
  html = html.replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g, (_, text, url) =>
    put(`<a href="${url}" target="_blank" rel="noopener noreferrer">${renderEmphasis(text)}</a>`));
  html = renderEmphasis(html);
  // A link's text may hold a code span's placeholder: restore until none is left.
  while (html.includes("\u0000")) html = html.replace(/\u0000(\d+)\u0000/g, (_, i) => stash[Number(i)]);
  return html;
}

// Block structure, line by line. An unclosed fence runs to the end: while a reply streams, its code block
// is shown as code before the closing ``` arrives.
function renderMarkdown(text) {
  const lines = escapeHtml(text.replace(/\u0000/g, "")).split(/\r?\n/);
  const out = [];
  let paragraph = [];
  let list = null; // { tag: "ul" | "ol", items: [] }

  const flushParagraph = () => {
    if (paragraph.length) out.push(`<p>${paragraph.map(renderInline).join("<br>")}</p>`);
    paragraph = [];
  };
  const flushList = () => {
    if (list) out.push(`<${list.tag}>${list.items.map((i) => `<li>${renderInline(i)}</li>`).join("")}</${list.tag}>`);
    list = null;
  };
  const flush = () => { flushParagraph(); flushList(); };

  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+#.-]*)/);
    if (fence) {
      flush();
      const code = [];
      for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) code.push(lines[i]);
      const lang = fence[1] ? ` data-lang="${fence[1]}"` : "";
      out.push(`<pre${lang}><code>${code.join("\n")}</code></pre>`);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
    const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
    if (heading) {
      flush();
      const level = Math.min(heading[1].length + 2, 6); // "#" becomes h3: a reply's heading stays small
      out.push(`<h${level}>${renderInline(heading[2])}</h${level}>`);
    } else if (bullet || numbered) {
      flushParagraph();
      const tag = bullet ? "ul" : "ol";
      if (list && list.tag !== tag) flushList();
      list = list || { tag, items: [] };
      list.items.push((bullet || numbered)[1]);
    } else if (line.trim() === "") {
      flush();
    } else {
      flushList();
      paragraph.push(line);
    }
  }
  flush();
  return out.join("");
}

window.renderMarkdown = renderMarkdown;
