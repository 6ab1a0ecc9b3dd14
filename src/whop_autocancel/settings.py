"""All configuration in one pydantic-settings object, read from the environment and `.env`.

Every delay, window and limit is a field; durations are in seconds (fractions allowed, which is
how the demo and the tests run the production schedule faster).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from whop_autocancel import affinity
from whop_autocancel.errors import ConfigurationError
from whop_autocancel.sealing import Sealer

DEFAULT_DATABASE_URL = "sqlite:///whop-autocancel.db"
DEFAULT_QUEUE_URL = "sqlite:///whop-autocancel-queue.db"

METRICS_TOKEN_MIN_LENGTH = 16
# A webhook secret shorter than this (after its prefix) is a copy mistake, not a secret: Whop's
# is `ws_` and 48 hex characters; a Standard Webhooks secret (`whsec_` and base64) holds 24 to
# 64 random bytes.
MIN_WEBHOOK_SECRET_CHARS = 24
WEBHOOK_SECRET_PREFIXES = ("ws_", "whsec_")
# The dashboard's session secret: 32 characters of `secrets.token_urlsafe` are 192 bits.
MIN_SESSION_SECRET_CHARS = 32

NonNegativeSeconds = Annotated[float, Field(ge=0)]
PositiveSeconds = Annotated[float, Field(gt=0)]


@dataclass(frozen=True)
class SmtpConfig:
    """Where outbound mail goes, parsed from `SMTP_URL`."""

    host: str
    port: int
    username: str | None
    password: str | None
    implicit_tls: bool  # smtps://
    starttls: bool  # ?starttls=required

    def describe(self) -> str:
        """The URL without the password, safe to print."""
        scheme = "smtps" if self.implicit_tls else "smtp"
        user = f"{self.username}:***@" if self.username else ""
        query = "?starttls=required" if self.starttls else ""
        return f"{scheme}://{user}{self.host}:{self.port}{query}"


def parse_smtp_url(url: str) -> SmtpConfig:
    """Parse `smtp://[user:pass@]host:port[?starttls=required]` or `smtps://…`."""
    parts = urlsplit(url)
    if parts.scheme not in ("smtp", "smtps"):
        raise ValueError("must start with smtp:// or smtps://")
    if not parts.hostname:
        raise ValueError("has no host")
    try:
        port = parts.port
    except ValueError as error:
        raise ValueError("has an invalid port") from error
    implicit_tls = parts.scheme == "smtps"
    if port == 0:
        raise ValueError("has port 0")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"starttls"}
    if unknown:
        raise ValueError(f"has unknown options: {', '.join(sorted(unknown))}")
    starttls_values = query.get("starttls", [])
    if starttls_values and starttls_values != ["required"]:
        raise ValueError("takes only starttls=required")
    if implicit_tls and starttls_values:
        raise ValueError("smtps:// is already TLS; drop starttls")
    return SmtpConfig(
        host=parts.hostname,
        port=port or (465 if implicit_tls else 25),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        implicit_tls=implicit_tls,
        starttls=bool(starttls_values),
    )


_DATABASE_DRIVERS = {
    "sqlite": "sqlite",
    "postgresql": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mysql+pymysql": "mysql+pymysql",
    "mariadb": "mysql+pymysql",
    "mariadb+pymysql": "mysql+pymysql",
}


def normalise_database_url(url: str) -> str:
    """One spelling per backend: psycopg 3 for PostgreSQL, PyMySQL for MariaDB/MySQL."""
    scheme, separator, rest = url.partition("://")
    driver = _DATABASE_DRIVERS.get(scheme)
    if not separator or driver is None:
        raise ValueError(
            "must be sqlite:///PATH, postgresql://USER:PASS@HOST/DB or "
            "mysql+pymysql://USER:PASS@HOST/DB"
        )
    if driver == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise ValueError("must be sqlite:///PATH (three slashes, then the file)")
        return url
    _check_server_url(rest)
    return f"{driver}://{rest}"


def normalise_queue_url(url: str) -> str:
    """sqlite:///PATH, postgresql://… in libpq's own form (huey hands it to psycopg), or
    redis://…."""
    scheme, separator, rest = url.partition("://")
    if separator and scheme == "sqlite" and rest.startswith("/") and rest != "/":
        return url
    if separator and scheme in ("postgresql", "postgresql+psycopg", "postgres"):
        _check_server_url(rest)
        return f"postgresql://{rest}"
    if separator and scheme in ("redis", "rediss"):
        _check_server_url(rest)
        return url
    raise ValueError(
        "must be sqlite:///PATH, postgresql://USER:PASS@HOST/DB or redis://HOST:6379/0"
    )


def _check_server_url(rest: str) -> None:
    parts = urlsplit("x://" + rest)
    if not parts.hostname:
        raise ValueError("has no host")
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise ValueError("has an invalid port") from None


def _split(value: Any, separator: str | None) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(separator) if item.strip()]
    return value


class Settings(BaseSettings):
    """The service's settings. Field names are the environment variable names."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        case_sensitive=True,
        extra="ignore",
        frozen=True,
        env_ignore_empty=True,  # SETTING= (empty) means "not set", as in most .env files
    )

    # Whop
    WHOP_API_KEY: SecretStr | None = None
    WHOP_API_URL: str = "https://api.whop.com/api/v1"
    WHOP_API_VERSION_DATE: str | None = None
    WHOP_COMPANY_ID: str | None = None
    WHOP_TIMEOUT: PositiveSeconds = 10.0
    WHOP_RATE_LIMIT: Annotated[float, Field(gt=0, le=10000)] = 10.0
    WHOP_RATE_BURST: Annotated[int, Field(ge=1, le=10000)] = 5
    WHOP_WEBHOOK_SECRET: SecretStr | None = None

    # Checkout API (POST /api/checkouts)
    CHECKOUT_REDIRECT_URL: str | None = None
    CHECKOUT_TOKEN: SecretStr | None = None
    CHECKOUT_RATE_LIMIT: str = "10/minute"
    CHECKOUT_CORS_ORIGINS: Annotated[list[str], NoDecode] = []
    CHECKOUT_TIMEOUT: PositiveSeconds = 5.0
    FORWARDED_ALLOW_IPS: str = "127.0.0.1"

    # Storage and jobs
    DATABASE_URL: str = DEFAULT_DATABASE_URL
    QUEUE_URL: str = DEFAULT_QUEUE_URL
    QUEUE_NAME: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,40}$")] = "whop-autocancel"
    WORKER_THREADS: Annotated[int, Field(ge=1, le=64)] = 4
    CPU_AFFINITY: str = "auto"  # see affinity.py
    SHUTDOWN_TIMEOUT: NonNegativeSeconds = 30.0
    WORKER_HEARTBEAT_MAX_AGE: PositiveSeconds = 120.0

    # Flow timings
    CANCEL_DELAY: NonNegativeSeconds = 5.0
    MATCH_WINDOW: NonNegativeSeconds = 600.0
    PENDING_ORDER_TTL: PositiveSeconds = 86400.0
    EMAIL_GIVE_UP_AFTER: PositiveSeconds = 3600.0
    RETRY_SCHEDULE: Annotated[list[PositiveSeconds], NoDecode] = [1, 2, 4, 10, 30, 60]
    CANCEL_GIVE_UP_AFTER: NonNegativeSeconds = 86400.0
    CANCEL_LEASE: PositiveSeconds = 60.0
    MEMBERSHIP_WAIT: NonNegativeSeconds = 300.0
    WEBHOOK_TOLERANCE: PositiveSeconds = 300.0
    WEBHOOK_MAX_BYTES: Annotated[int, Field(ge=1024)] = 1024 * 1024
    SWEEP_INTERVAL: PositiveSeconds = 60.0
    WHOP_SWEEP_INTERVAL: PositiveSeconds = 300.0
    WHOP_SWEEP_LOOKBACK: PositiveSeconds = 259200.0
    WHOP_SWEEP_OVERLAP: NonNegativeSeconds = 600.0
    STUCK_GRACE: NonNegativeSeconds = 30.0
    EVENT_MAX_ATTEMPTS: Annotated[int, Field(ge=1)] = 5
    SIGNATURE_FAILURES_ALERT_AT: Annotated[int, Field(ge=1)] = 20
    SIGNATURE_FAILURES_WINDOW: PositiveSeconds = 300.0

    # Mail and alerts
    ADMIN_EMAILS: Annotated[list[str], NoDecode] = []
    SMTP_URL: SecretStr = SecretStr("smtp://localhost:25")
    SMTP_TIMEOUT: PositiveSeconds = 10.0
    MAIL_FROM: str | None = None
    SUPPORT_EMAIL: str | None = None
    ALERT_THROTTLE: NonNegativeSeconds = 900.0
    ALERT_WEBHOOK_URL: SecretStr | None = None
    EMAIL_TEMPLATES_DIR: Path | None = None

    # The dashboard (/admin): off unless a password hash is set
    ADMIN_PASSWORD_HASH: SecretStr | None = None
    ADMIN_SESSION_SECRET: SecretStr | None = None
    ADMIN_SESSION_MAX_AGE: PositiveSeconds = 43200.0
    ADMIN_LOGIN_MAX_FAILURES: Annotated[int, Field(ge=1)] = 5
    ADMIN_LOGIN_WINDOW: PositiveSeconds = 900.0

    # Catalog, stock and logs
    CATALOG_PATH: Path = Path("catalog.toml")
    STOCK_ENCRYPTION_KEY: SecretStr | None = None
    LOG_LEVEL: str = "INFO"
    LOG_FORMAT: str = "json"
    ACCESS_LOG: bool = False

    # Monitoring: GET /metrics answers only `Authorization: Bearer <METRICS_TOKEN>` (unset: off)
    METRICS_TOKEN: SecretStr | None = None

    @field_validator("RETRY_SCHEDULE", mode="before")
    @classmethod
    def _split_schedule(cls, value: Any) -> Any:
        return _split(value, ",")

    @field_validator("RETRY_SCHEDULE")
    @classmethod
    def _schedule_not_empty(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("needs at least one delay, e.g. 1,2,4,10,30,60")
        return value

    @field_validator("CPU_AFFINITY")
    @classmethod
    def _check_affinity(cls, value: str) -> str:
        affinity.parse(value)  # raises ValueError with what is wrong
        return value.strip().lower()

    @field_validator("ADMIN_EMAILS", "CHECKOUT_CORS_ORIGINS", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        return _split(value, ",")

    @field_validator("CHECKOUT_CORS_ORIGINS")
    @classmethod
    def _check_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
                raise ValueError(f"{origin!r} is not an origin such as https://shop.example.com")
        return value

    @field_validator("ALERT_WEBHOOK_URL")
    @classmethod
    def _check_alert_webhook(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and urlsplit(value.get_secret_value()).scheme not in (
            "http",
            "https",
        ):
            raise ValueError("must be the https:// URL of a Discord or Slack incoming webhook")
        return value

    @field_validator("CHECKOUT_REDIRECT_URL")
    @classmethod
    def _check_redirect(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("must be an http(s) URL of your success page")
        return value

    @field_validator("CHECKOUT_RATE_LIMIT")
    @classmethod
    def _check_rate_limit(cls, value: str) -> str:
        from limits import parse

        if value.strip().lower() in ("", "off", "0"):
            return "off"
        try:
            parse(value)
        except ValueError:
            raise ValueError("must look like 10/minute, 100/hour or off") from None
        return value

    @field_validator("ADMIN_EMAILS")
    @classmethod
    def _check_emails(cls, value: list[str]) -> list[str]:
        for address in value:
            _check_address(address)
        return value

    @field_validator("MAIL_FROM", "SUPPORT_EMAIL")
    @classmethod
    def _check_sender(cls, value: str | None) -> str | None:
        if value is not None:
            _check_address(value)
        return value

    @field_validator("SMTP_URL")
    @classmethod
    def _check_smtp(cls, value: SecretStr) -> SecretStr:
        parse_smtp_url(value.get_secret_value())
        return value

    @field_validator("WHOP_API_URL")
    @classmethod
    def _check_api_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http(s) URL such as https://api.whop.com/api/v1")
        return value.rstrip("/")

    @field_validator("WHOP_API_VERSION_DATE")
    @classmethod
    def _check_version_date(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            return None
        return value

    @field_validator("WHOP_WEBHOOK_SECRET")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().split():
            return None
        secrets = value.get_secret_value().split()
        for number, secret in enumerate(secrets, start=1):
            if len(_without_prefix(secret)) < MIN_WEBHOOK_SECRET_CHARS:
                which = f"secret {number} of {len(secrets)} is" if len(secrets) > 1 else "is"
                raise ValueError(
                    f"{which} too short to be a real secret: Whop's is ws_ and 48 hex "
                    f"characters (at least {MIN_WEBHOOK_SECRET_CHARS} characters after ws_ or "
                    "whsec_); copy it whole from Dashboard → Developer → Webhooks"
                )
        return value

    @field_validator("STOCK_ENCRYPTION_KEY")
    @classmethod
    def _check_stock_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().split():
            return None
        try:
            Sealer(value.get_secret_value())
        except ConfigurationError as error:
            raise ValueError(str(error).removeprefix("STOCK_ENCRYPTION_KEY: ")) from None
        return value

    @field_validator("METRICS_TOKEN")
    @classmethod
    def _check_metrics_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        token = value.get_secret_value()
        if token != token.strip() or any(character.isspace() for character in token):
            raise ValueError("must not contain spaces (it is sent as a bearer token)")
        if len(token) < METRICS_TOKEN_MIN_LENGTH:
            raise ValueError(
                f"must be at least {METRICS_TOKEN_MIN_LENGTH} characters long (it guards "
                "/metrics); make one with `python3 -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'`"
            )
        return value

    @field_validator("ADMIN_PASSWORD_HASH")
    @classmethod
    def _check_password_hash(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        from argon2 import extract_parameters
        from argon2.exceptions import InvalidHashError

        try:
            extract_parameters(value.get_secret_value().strip())
        except InvalidHashError:
            raise ValueError(
                "is not an argon2 hash; set it with `whop-autocancel admin set-password`"
            ) from None
        return SecretStr(value.get_secret_value().strip())

    @field_validator("ADMIN_SESSION_SECRET")
    @classmethod
    def _check_session_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        if len(value.get_secret_value().strip()) < MIN_SESSION_SECRET_CHARS:
            raise ValueError(
                f"must be at least {MIN_SESSION_SECRET_CHARS} characters; "
                "`whop-autocancel admin set-password` writes a random one"
            )
        return SecretStr(value.get_secret_value().strip())

    @field_validator("EMAIL_TEMPLATES_DIR")
    @classmethod
    def _check_templates_dir(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"{value} is not a directory")
        return value

    @field_validator("DATABASE_URL")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        return normalise_database_url(value)

    @field_validator("QUEUE_URL")
    @classmethod
    def _check_queue_url(cls, value: str) -> str:
        return normalise_queue_url(value)

    @field_validator("LOG_FORMAT")
    @classmethod
    def _check_log_format(cls, value: str) -> str:
        if value not in ("json", "console"):
            raise ValueError("must be json or console")
        return value

    @field_validator("LOG_LEVEL")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return value.upper()

    @model_validator(mode="after")
    def _check_heartbeat(self) -> Settings:
        if self.WORKER_HEARTBEAT_MAX_AGE <= self.SWEEP_INTERVAL:
            raise ValueError(
                "WORKER_HEARTBEAT_MAX_AGE must be more than SWEEP_INTERVAL (workers beat once "
                "per sweep interval)"
            )
        return self

    @model_validator(mode="after")
    def _check_lease(self) -> Settings:
        if self.CANCEL_LEASE <= self.WHOP_TIMEOUT * 2:
            raise ValueError(
                "CANCEL_LEASE must be more than twice WHOP_TIMEOUT (a cancel makes up to two calls)"
            )
        return self

    @model_validator(mode="after")
    def _check_dashboard(self) -> Settings:
        if self.ADMIN_PASSWORD_HASH is not None and self.ADMIN_SESSION_SECRET is None:
            raise ValueError(
                "ADMIN_SESSION_SECRET must be set when ADMIN_PASSWORD_HASH is (it signs the "
                "dashboard's session cookies): `whop-autocancel admin set-password` writes both"
            )
        return self

    # Derived values -------------------------------------------------------------------------

    @property
    def webhook_secrets(self) -> list[bytes]:
        """The raw bytes of each configured secret (rotation: several, space-separated)."""
        if self.WHOP_WEBHOOK_SECRET is None:
            return []
        return [part.encode() for part in self.WHOP_WEBHOOK_SECRET.get_secret_value().split()]

    @property
    def sealer(self) -> Sealer | None:
        """The stock cipher, or None when no key is set (then nothing can be sold from stock)."""
        if self.STOCK_ENCRYPTION_KEY is None:
            return None
        return Sealer(self.STOCK_ENCRYPTION_KEY.get_secret_value())

    @property
    def smtp(self) -> SmtpConfig:
        return parse_smtp_url(self.SMTP_URL.get_secret_value())

    @property
    def dashboard_enabled(self) -> bool:
        """The dashboard answers only once a password hash (and its session secret) is set."""
        return self.ADMIN_PASSWORD_HASH is not None and self.ADMIN_SESSION_SECRET is not None

    @property
    def uses_versioned_api(self) -> bool:
        return self.WHOP_API_VERSION_DATE is not None

    @property
    def whop_listing_settings(self) -> tuple[str, ...]:
        """What listing at Whop (sweep, backfill, recover) needs: the API key, and with the
        legacy API the company id."""
        if self.uses_versioned_api:
            return ("WHOP_API_KEY",)
        return ("WHOP_API_KEY", "WHOP_COMPANY_ID")

    def missing(self, *names: str) -> list[str]:
        """One line per setting of `names` that is not set, naming it and how to set it."""
        return [
            f"{name} is not set: {_REQUIRED_HELP[name]}"
            for name in names
            if getattr(self, name) is None or getattr(self, name) == []
        ]

    def require(self, *names: str) -> None:
        """Stop with one error naming every setting of `names` that is missing."""
        problems = self.missing(*names)
        if problems:
            raise settings_error(problems)

    def require_runtime(self) -> None:
        """What `serve` and `worker` cannot run without."""
        self.require(*RUNTIME_SETTINGS)


# What `serve` and `worker` (and `check`) cannot run without.
RUNTIME_SETTINGS = ("WHOP_API_KEY", "WHOP_WEBHOOK_SECRET", "ADMIN_EMAILS", "MAIL_FROM")


_REQUIRED_HELP = {
    "WHOP_API_KEY": "set it to your Whop account API key (Dashboard → Developer → API keys)",
    "WHOP_WEBHOOK_SECRET": "set it to the webhook's ws_… secret shown in the Whop dashboard",
    "ADMIN_EMAILS": "set it to the comma-separated addresses that receive alerts",
    "MAIL_FROM": "set it to the sender address of every email, e.g. shop@example.com",
    "WHOP_COMPANY_ID": "set it to your biz_… company id",
    "STOCK_ENCRYPTION_KEY": (
        "stock items are stored encrypted; create a key with `whop-autocancel stock keygen`, "
        "set it and keep a copy in a safe place (items cannot be read without it)"
    ),
}


def _without_prefix(secret: str) -> str:
    for prefix in WEBHOOK_SECRET_PREFIXES:
        if secret.startswith(prefix):
            return secret.removeprefix(prefix)
    return secret


def _check_address(address: str) -> None:
    local, at, domain = address.rpartition("@")
    if not at or not local or "." not in domain or any(c.isspace() for c in address):
        raise ValueError(f"{address!r} is not an email address")


def settings_error(problems: list[str]) -> ConfigurationError:
    """One error for every problem found: one line alone, or a count and one line each."""
    if len(problems) == 1:
        return ConfigurationError(problems[0])
    lines = "\n".join(f"  {problem}" for problem in problems)
    return ConfigurationError(f"{len(problems)} settings to fix:\n{lines}")


def _problems(error: ValidationError) -> tuple[list[str], set[str]]:
    """Each validation error as `NAME: message`, and the names of the fields that failed."""
    problems, fields = [], set()
    for detail in error.errors():
        name = ".".join(str(part) for part in detail["loc"])
        message = detail["msg"].removeprefix("Value error, ")
        # A check across settings has no single field; its message starts with the names.
        problems.append(f"{name}: {message}" if name else message)
        if detail["loc"]:
            fields.add(str(detail["loc"][0]))
    return problems, fields


# The settings a command needs: names, or a function of the settings (what listing at Whop
# needs depends on the API version).
Required = Sequence[str] | Callable[["Settings"], Sequence[str]]


def load_settings(*, required: Required = (), **overrides: Any) -> Settings:
    """Read the settings, and check that those `required` are set. Every problem is reported
    at once, in one `ConfigurationError` naming each setting: every invalid value, and every
    required setting that is missing (learnt by reading the settings again with the invalid
    ones at their defaults)."""
    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        problems, fields = _problems(error)
        if fields:
            defaults = {name: Settings.model_fields[name].get_default() for name in fields}
            try:
                rest = Settings(**{**overrides, **defaults})
            except ValidationError:  # the defaults fail a check across settings: say no more
                rest = None
            if rest is not None:
                names = required(rest) if callable(required) else required
                problems += rest.missing(*(name for name in names if name not in fields))
        raise settings_error(problems) from None
    problems = settings.missing(*(required(settings) if callable(required) else required))
    if problems:
        raise settings_error(problems)
    return settings
