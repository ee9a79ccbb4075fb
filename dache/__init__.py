"""dache: a durable cache served over HTTP/JSON."""

__version__ = "0.4.0"
