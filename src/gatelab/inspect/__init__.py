"""Tools that look at routing decisions: telemetry now; profiling and plots later."""

from .telemetry import RoutingMonitor, routing_stats

__all__ = ["RoutingMonitor", "routing_stats"]
