"""Monitoring: metric sinks (jsonl, TensorBoard), progress display and run reports."""

from grouprl.monitor.progress import ProgressBar, format_postfix
from grouprl.monitor.report import plot_curves, write_summary
from grouprl.monitor.sinks import METRICS_FILE, MetricsLogger, read_metrics

__all__ = [
    "METRICS_FILE",
    "MetricsLogger",
    "ProgressBar",
    "format_postfix",
    "plot_curves",
    "read_metrics",
    "write_summary",
]
