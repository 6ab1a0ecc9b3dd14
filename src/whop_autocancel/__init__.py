"""whop-autocancel: deliver Whop one-time purchases and cancel their memberships, unattended."""

__version__ = "0.1.0"
