"""cancellation."""
