/**
 * A small Markdown renderer for the narrator's text that is safe by construction:
 * every character of the input is HTML-escaped first, and only the tags made here
 * (p, h1–h6, ul/ol/li, blockquote, pre/code, strong, em, a, br) are added. Links keep
 * only http(s), mailto and relative targets, so `javascript:` cannot get through.
 *
 * Supported: paragraphs, `#` headings, bullet and numbered lists, `>` quotes, ``` fences,
 * `code`, **strong**, *em* or _em_, [text](url) and bare http(s) URLs.
 */

const ESCAPES: Record<string, string> = {
  "&": "&amp;",
  "<": "&lt;",
  ">": "&gt;",
  '"': "&quot;",
  "'": "&#39;",
};

/** `text` with the five HTML-special characters escaped. */
export function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => ESCAPES[c] ?? c);
}

/** HTML for the Markdown `source`; the output never contains a tag the input wrote. */
export function renderMarkdown(source: string): string {
  const lines = source.replace(/\0/g, "").replace(/\r\n?/g, "\n").split("\n");
  const out: string[] = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i] ?? "";
    const fence = /^\s*(```|~~~)\s*([\w+-]*)\s*$/.exec(line);
    if (fence) {
      const code: string[] = [];
      i++;
      while (i < lines.length && !(lines[i] ?? "").trim().startsWith(fence[1] ?? "```")) {
        code.push(lines[i] ?? "");
        i++;
      }
      i++; // the closing fence (or the end of a still-streaming block)
      const lang = fence[2] ? ` class="language-${escapeHtml(fence[2])}"` : "";
      out.push(`<pre><code${lang}>${escapeHtml(code.join("\n"))}</code></pre>`);
      continue;
    }
    if (line.trim() === "") {
      i++;
      continue;
    }
    const heading = /^(#{1,6})\s+(.*?)\s*#*\s*$/.exec(line);
    if (heading) {
      const level = (heading[1] ?? "#").length;
      out.push(`<h${level}>${inline(heading[2] ?? "")}</h${level}>`);
      i++;
      continue;
    }
    if (/^\s*>/.test(line)) {
      const quoted: string[] = [];
      while (i < lines.length && /^\s*>/.test(lines[i] ?? "")) {
        quoted.push((lines[i] ?? "").replace(/^\s*>\s?/, ""));
        i++;
      }
      out.push(`<blockquote>${renderMarkdown(quoted.join("\n"))}</blockquote>`);
      continue;
    }
    const item = listItem(line);
    if (item) {
      const items: string[] = [];
      while (i < lines.length) {
        const next = listItem(lines[i] ?? "");
        if (next && next.ordered === item.ordered) {
          items.push(next.text);
        } else if (items.length > 0 && /^\s{2,}\S/.test(lines[i] ?? "")) {
          items[items.length - 1] += ` ${(lines[i] ?? "").trim()}`; // a wrapped item
        } else {
          break;
        }
        i++;
      }
      const tag = item.ordered ? "ol" : "ul";
      out.push(`<${tag}>${items.map((t) => `<li>${inline(t)}</li>`).join("")}</${tag}>`);
      continue;
    }
    const paragraph: string[] = [];
    while (i < lines.length) {
      const next = lines[i] ?? "";
      if (next.trim() === "" || /^(#{1,6}\s|\s*>|\s*(```|~~~))/.test(next) || listItem(next)) break;
      paragraph.push(next.trim());
      i++;
    }
    out.push(`<p>${paragraph.map(inline).join("<br>")}</p>`);
  }
  return out.join("");
}

function listItem(line: string): { ordered: boolean; text: string } | undefined {
  const bullet = /^\s{0,3}[-*+]\s+(.*)$/.exec(line);
  if (bullet) return { ordered: false, text: bullet[1] ?? "" };
  const numbered = /^\s{0,3}\d{1,9}[.)]\s+(.*)$/.exec(line);
  if (numbered) return { ordered: true, text: numbered[1] ?? "" };
  return undefined;
}

/** Inline Markdown of one line; code spans are cut out first so nothing inside them is formatted. */
function inline(text: string): string {
  const held: string[] = [];
  const hold = (html: string): string => `\0${held.push(html) - 1}\0`;
  let s = text.replace(/`([^`]+)`/g, (_, code: string) => hold(`<code>${escapeHtml(code)}</code>`));
  s = s.replace(/\[([^\]]+)\]\(([^)\s]+)\)/g, (whole, label: string, url: string) => {
    const href = safeUrl(url);
    return href === undefined ? whole : hold(`<a href="${escapeHtml(href)}" rel="noopener noreferrer" target="_blank">${escapeHtml(label)}</a>`);
  });
  s = s.replace(/\bhttps?:\/\/[^\s<>"']+[^\s<>"'.,;:!?)\]]/g, (url) =>
    hold(`<a href="${escapeHtml(url)}" rel="noopener noreferrer" target="_blank">${escapeHtml(url)}</a>`),
  );
  s = escapeHtml(s);
  s = s.replace(/\*\*(?=\S)([^*]*?\S)\*\*/g, "<strong>$1</strong>");
  s = s.replace(/__(?=\S)([^_]*?\S)__/g, "<strong>$1</strong>");
  s = s.replace(/(^|[^*\w])\*(?=\S)([^*]*?\S)\*(?!\w)/g, "$1<em>$2</em>");
  s = s.replace(/(^|[^_\w])_(?=\S)([^_]*?\S)_(?!\w)/g, "$1<em>$2</em>");
  return s.replace(/\0(\d+)\0/g, (_, n: string) => held[Number(n)] ?? "");
}

/** The link target if it is http(s), mailto or relative; undefined for anything else (javascript:, data:, …). */
function safeUrl(url: string): string | undefined {
  const scheme = /^([a-z][a-z0-9+.-]*):/i.exec(url);
  if (scheme === null) return url;
  return ["http", "https", "mailto"].includes((scheme[1] ?? "").toLowerCase()) ? url : undefined;
}
