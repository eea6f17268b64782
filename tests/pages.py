"""What an fp-monitor report page holds, read by the unit tests from the rendered string and by
the integration tests from the DOM a real browser built of it."""

from __future__ import annotations

from html.parser import HTMLParser


class PageOutline(HTMLParser):
    """Per ``<svg class="plot">``: its ``data-check`` and its texts by class (by tag where an
    element has no class); the page's other texts by tag; the table rows (header included); how
    many ``<script>`` and ``<img>`` elements there are. Whitespace-only texts are left out."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.plots: list[dict] = []
        self.texts: dict[str, list[str]] = {}
        self.rows: list[list[str]] = []
        self.scripts = self.images = 0
        self._open: list[tuple[str, str]] = []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "svg" and "plot" in (attrs.get("class") or "").split():
            self.plots.append({"check": attrs.get("data-check"), "texts": {}})
        self.scripts += tag == "script"
        self.images += tag == "img"
        if tag == "tr":
            self.rows.append([])
        self._open.append((tag, attrs.get("class") or tag))

    def handle_endtag(self, tag):
        # Pops up to the element's start tag: elements HTML lets go unclosed (<p>, <td>) end too.
        while self._open and self._open.pop()[0] != tag:
            pass

    def handle_data(self, data):
        if not self._open or not data.strip():
            return
        tag, css = self._open[-1]
        if tag in ("td", "th") and self.rows:
            self.rows[-1].append(data.strip())
        if self.plots and any(t == "svg" for t, _ in self._open):
            self.plots[-1]["texts"].setdefault(css, []).append(data.strip())
        else:
            self.texts.setdefault(tag, []).append(data.strip())
