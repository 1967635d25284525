"""The evaluation report as a self-contained HTML page (`render_html`)."""

from services.report.html import render_html

__all__ = ["render_html"]
