"""The admin layer: every operation a merchant runs (find, show, retry, replay, ignore, resend,
void, import, cancel), shared by the CLI and the dashboard, each one recorded in the audit table."""
