"""What a person reads: metrics and plots of a classifier (:mod:`.evaluate`), the extraction report in
Markdown and JSON (:mod:`.markdown`)."""
from .markdown import extract_markdown, extract_table, write_report

__all__ = ["extract_markdown", "extract_table", "write_report"]
