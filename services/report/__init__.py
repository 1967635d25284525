"""The evaluation report as a self-contained HTML page (`render_html`; `page` never raises)."""

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def render_html(report: dict, gallery: dict | None = None) -> str:
    """The report as one page (services/report/html.py); matplotlib and the template load on the first call."""
    from services.report.html import render_html as render

    return render(report, gallery)


def page(report: dict, gallery: Callable[[], dict | None]) -> str | None:
    """The report's page with the examples `gallery()` generates; None (and a logged error) when generating or
    rendering fails: a page is a view of report.json and never costs a run its results."""
    try:
        return render_html(report, gallery())
    except Exception:
        log.exception("the report page could not be rendered; report.json holds every number")
        return None


__all__ = ["page", "render_html"]
