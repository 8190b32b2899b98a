import { describe, expect, it } from "vitest";
import { escapeHtml, renderMarkdown } from "../../web/markdown.js";

describe("renderMarkdown is safe", () => {
  it.each([
    "<script>alert(1)</script>",
    '<img src=x onerror="alert(1)">',
    "**<b>bold</b>**",
    "`<i>code</i>`",
    "```\n</code></pre><script>x</script>\n```",
    '[x](http://a"onmouseover="alert(1))',
    "# <h1>",
    "- <li>item",
    "> <blockquote>",
  ])("never lets the input's own tags through: %s", (source) => {
    const html = renderMarkdown(source);
    expect(html).not.toMatch(/<(script|img|b|i|li>item)\b/);
    expect(html).not.toMatch(/<[a-z]+[^>]*\son\w+=/i);
  });

  it("drops javascript: and data: links but keeps their text", () => {
    expect(renderMarkdown("[click](javascript:alert(1))")).not.toContain("href");
    expect(renderMarkdown("[click](JavaScript:alert(1))")).not.toContain("href");
    expect(renderMarkdown("[img](data:text/html,x)")).not.toContain("href");
  });

  it("escapes all five special characters", () => {
    expect(escapeHtml(`<a href="x" title='y'>&</a>`)).toBe(
      "&lt;a href=&quot;x&quot; title=&#39;y&#39;&gt;&amp;&lt;/a&gt;",
    );
  });

  it("ignores NUL bytes, which it uses internally", () => {
    expect(renderMarkdown("a\u00000\u0000b `c`")).toBe("<p>a0b <code>c</code></p>");
  });
});

describe("renderMarkdown formats", () => {
  it("paragraphs with line breaks, split by blank lines", () => {
    expect(renderMarkdown("one\ntwo\n\nthree")).toBe("<p>one<br>two</p><p>three</p>");
  });

  it("headings, strong, em and code", () => {
    expect(renderMarkdown("## Title\n**bold** and *it* and _it_ and `x*y*z`")).toBe(
      "<h2>Title</h2><p><strong>bold</strong> and <em>it</em> and <em>it</em> and <code>x*y*z</code></p>",
    );
  });

  it("leaves snake_case and 2*3*4 alone", () => {
    expect(renderMarkdown("snake_case_name and 2 * 3 * 4")).toBe("<p>snake_case_name and 2 * 3 * 4</p>");
  });

  it("bullet and numbered lists", () => {
    expect(renderMarkdown("- a\n- b\n\n1. x\n2. y")).toBe(
      "<ul><li>a</li><li>b</li></ul><ol><li>x</li><li>y</li></ol>",
    );
  });

  it("fenced code keeps its text verbatim, even while still streaming (no closing fence)", () => {
    expect(renderMarkdown("```python\nprint(1 < 2)\n```")).toBe(
      '<pre><code class="language-python">print(1 &lt; 2)</code></pre>',
    );
    expect(renderMarkdown("```\nx = **1**")).toBe("<pre><code>x = **1**</code></pre>");
  });

  it("links and bare URLs open in a new tab", () => {
    expect(renderMarkdown("see [docs](https://docs.python.org/3/) or https://example.com.")).toBe(
      '<p>see <a href="https://docs.python.org/3/" rel="noopener noreferrer" target="_blank">docs</a> or ' +
        '<a href="https://example.com" rel="noopener noreferrer" target="_blank">https://example.com</a>.</p>',
    );
  });

  it("quotes", () => {
    expect(renderMarkdown("> quoted *text*")).toBe("<blockquote><p>quoted <em>text</em></p></blockquote>");
  });
});
