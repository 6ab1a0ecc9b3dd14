"""The dashboard at /admin: server-rendered pages on the admin layer, behind a password, a
signed session cookie and a CSRF token on every form. Off unless ADMIN_PASSWORD_HASH is set."""
