"""whop."""
