"""The visual report of an output folder: ``report.html`` (self-contained) and ``report.md`` with PNGs."""

from qvggt_export.report.build import write_report, write_run_report

__all__ = ["write_report", "write_run_report"]
