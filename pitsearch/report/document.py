"""The report as a list of blocks, rendered twice: report.md (figures as relative links) and report.html.

report.html is self-contained: inline CSS, figures as base64 PNG data URIs, no script and no link to anything,
because MLflow's artifact viewer shows an .html artifact in a sandboxed iframe loaded from a blob URL, where a
relative link or a stylesheet beside it resolves to nothing. One block list for both files keeps them saying the
same thing.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

from pitsearch.report.tables import markdown_table


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str            # plain text; `code` spans in backticks


@dataclass
class Bullets:
    items: list[str]
    emphasis: bool = False   # drawn as a highlighted box in HTML (the decisions)


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figures:
    paths: list[Path] = field(default_factory=list)   # PNGs on disk (read when the HTML is rendered)


Block = Heading | Paragraph | Bullets | Table | Figures


def to_markdown(blocks: list[Block]) -> str:
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines.append("#" * block.level + " " + block.text)
        elif isinstance(block, Paragraph):
            lines.append(block.text)
        elif isinstance(block, Bullets):
            lines.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Table):
            lines.append(markdown_table(block.header, block.rows))
        elif isinstance(block, Figures):
            lines.append("\n".join(f"![{p.stem}]({p.name})" for p in block.paths))
        lines.append("")
    return "\n".join(lines)


_STYLE = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2328; margin: 16px 24px; }
h1 { font-size: 22px; margin: 0 0 12px; } h2 { font-size: 17px; margin: 22px 0 8px; }
code { font: 12.5px ui-monospace, Menlo, Consolas, monospace; background: #f3f4f6; padding: 1px 4px;
       border-radius: 3px; }
table { border-collapse: collapse; margin: 4px 0 8px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } tr:nth-child(even) td { background: #fbfcfd; }
ul.emphasis { list-style: none; padding: 10px 14px; margin: 0 0 8px; background: #eef6ff;
              border-left: 4px solid #0969da; font-size: 15px; }
ul.emphasis li { margin: 3px 0; }
figure { margin: 8px 0 16px; } figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: 12px; }
"""


def to_html(blocks: list[Block], title: str) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(title)}</title>", f"<style>{_STYLE}</style>", "</head><body>"]
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Bullets):
            css = ' class="emphasis"' if block.emphasis else ""
            parts.append(f"<ul{css}>" + "".join(f"<li>{_inline(item)}</li>" for item in block.items) + "</ul>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in block.header)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>"
                           for row in block.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(block, Figures):
            parts += [_figure(path) for path in block.paths]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _figure(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    name = html.escape(Path(path).name)
    return (f'<figure><img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{name}</figcaption></figure>")


_CODE = re.compile(r"`([^`]+)`")


def _inline(text: str) -> str:
    """Escaped text with `code` spans; nothing else of markdown is interpreted."""
    return _CODE.sub(lambda m: f"<code>{m.group(1)}</code>", html.escape(text, quote=False))
