"""The labeling guidelines: a small Markdown subset rendered to HTML that cannot carry markup.

Every character of the source is HTML-escaped first; the only tags in the output are the ones
made here from fixed patterns (so ``<script>`` in a guideline shows as text). Supported:
``#`` headings, paragraphs, ``-``/``*`` and ``1.`` lists, fenced code blocks, ``**bold**``,
``*italic*``, ```code```; a link ``[text](url)`` shows as "text (url)", never as a live link.

>>> render_markdown("# Rank\\n- **best** first\\n- <b>not bold</b>")
'<h3>Rank</h3>\\n<ul><li><strong>best</strong> first</li><li>&lt;b&gt;not bold&lt;/b&gt;</li></ul>'
"""

from __future__ import annotations

import html
import re

DEFAULT = {
    "rank": "Rank the responses from best (1) to worst. Give two responses the same rank when you cannot prefer one.",
    "best-of-k": "Pick the best response.",
    "scores": "Rate each response from 1 (very bad) to 7 (excellent).",
    "pairwise": "Pick the better of the two responses.",
}

_INLINE = [
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
    (re.compile(r"\*\*(.+?)\*\*"), r"<strong>\1</strong>"),
    (re.compile(r"(?<![*\w])\*(?!\s)(.+?)(?<!\s)\*(?![*\w])"), r"<em>\1</em>"),
    (re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)"), r"\1 (\2)"),
]
_BULLET = re.compile(r"^\s*[-*+]\s+(.*)$")
_NUMBERED = re.compile(r"^\s*\d+[.)]\s+(.*)$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*$")


def _inline(text: str) -> str:
    out = html.escape(text, quote=True)
    for pattern, replacement in _INLINE:
        out = pattern.sub(replacement, out)
    return out


def render_markdown(text: str) -> str:
    blocks: list[str] = []
    paragraph: list[str] = []
    items: list[str] = []
    list_tag = ""
    lines = text.replace("\r\n", "\n").split("\n")

    def flush() -> None:
        nonlocal list_tag
        if paragraph:
            blocks.append("<p>" + " ".join(_inline(p) for p in paragraph) + "</p>")
            paragraph.clear()
        if items:
            blocks.append(f"<{list_tag}>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + f"</{list_tag}>")
            items.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith("```"):
            flush()
            code = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                code.append(lines[i])
                i += 1
            blocks.append("<pre><code>" + html.escape("\n".join(code)) + "</code></pre>")
        elif not line.strip():
            flush()
        elif heading := _HEADING.match(line):
            flush()
            level = min(len(heading.group(1)) + 2, 6)  # the page's own title is h1/h2
            blocks.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif (bullet := _BULLET.match(line)) or (numbered := _NUMBERED.match(line)):
            tag = "ul" if bullet else "ol"
            if paragraph or (items and tag != list_tag):
                flush()
            list_tag = tag
            items.append((bullet or numbered).group(1))  # type: ignore[union-attr]
        elif items and line.startswith((" ", "\t")):
            items[-1] += " " + line.strip()  # a list item continued on the next line
        else:
            if items:
                flush()
            paragraph.append(line.strip())
        i += 1
    flush()
    return "\n".join(blocks)
