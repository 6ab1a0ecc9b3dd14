"""Settings: defaults, parsing, and one-line errors that name the setting (DESIGN §5, §7)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from whop_autocancel.errors import ConfigurationError
from whop_autocancel.settings import Settings, load_settings

API_KEY = "sk_live_DISTINCTIVE_api_key_7f3e9a"
WEBHOOK_SECRET = "ws_DISTINCTIVE_webhook_secret_c41d"
NEW_SECRET = "ws_0f3a9c27e4b14d8fa6c2b5e81d907a3c5e6f1b2d4c8a9e07"
OLD_SECRET = "ws_5b1e0c9a7d3f42e68a0b9c1d2e3f4a5b6c7d8e9f0a1b2c3d"
ROOT = Path(__file__).resolve().parents[2]
SMTP_PASSWORD = "DISTINCTIVE-smtp-pass-88b1"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No setting leaks in from the real environment or a real `.env`."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def config_error(**overrides: object) -> str:
    with pytest.raises(ConfigurationError) as caught:
        load_settings(**overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message


def env_error(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> str:
    monkeypatch.setenv(name, value)
    return config_error()


# ----- defaults -------------------------------------------------------------------------------


def test_defaults() -> None:
    settings = load_settings()
    assert settings.CANCEL_DELAY == 5
    assert settings.MATCH_WINDOW == 600
    assert settings.RETRY_SCHEDULE == [1, 2, 4, 10, 30, 60]
    assert settings.CANCEL_GIVE_UP_AFTER == 86400
    assert settings.WHOP_API_URL == "https://api.whop.com/api/v1"
    assert settings.WHOP_API_VERSION_DATE is None
    assert settings.uses_versioned_api is False
    assert settings.WEBHOOK_TOLERANCE == 300
    assert settings.WHOP_API_KEY is None
    assert settings.webhook_secrets == []
    assert settings.ADMIN_EMAILS == []
    assert settings.CANCEL_LEASE > 2 * settings.WHOP_TIMEOUT


# ----- parsing --------------------------------------------------------------------------------


def test_retry_schedule_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETRY_SCHEDULE", "1, 2,3")
    assert load_settings().RETRY_SCHEDULE == [1.0, 2.0, 3.0]


def test_retry_schedule_takes_fractions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETRY_SCHEDULE", "0.01,0.02")
    assert load_settings().RETRY_SCHEDULE == [0.01, 0.02]


@pytest.mark.parametrize("value", [" , ", "1,x", "0,1", "-1", "1;2"])
def test_bad_retry_schedule_names_the_setting(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    assert env_error(monkeypatch, "RETRY_SCHEDULE", value).startswith("RETRY_SCHEDULE")


def test_a_blank_retry_schedule_says_what_is_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    message = env_error(monkeypatch, "RETRY_SCHEDULE", " , ")
    assert message.startswith("RETRY_SCHEDULE: ")
    assert "at least one delay" in message


def test_an_empty_setting_means_not_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETRY_SCHEDULE", "")
    monkeypatch.setenv("WHOP_COMPANY_ID", "")
    settings = load_settings()
    assert settings.RETRY_SCHEDULE == [1, 2, 4, 10, 30, 60]
    assert settings.WHOP_COMPANY_ID is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CANCEL_DELAY", "-1"),
        ("CANCEL_DELAY", "soon"),
        ("MATCH_WINDOW", "-0.5"),
        ("WHOP_TIMEOUT", "0"),
        ("WORKER_THREADS", "0"),
        ("WEBHOOK_MAX_BYTES", "10"),
        ("WHOP_API_URL", "api.whop.com"),
        ("DATABASE_URL", "postgresql:///no-host"),
        ("LOG_FORMAT", "xml"),
        ("LOG_LEVEL", "LOUD"),
        ("MAIL_FROM", "shop"),
        ("SMTP_URL", "http://mail.example.com"),
    ],
)
def test_invalid_value_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    assert env_error(monkeypatch, name, value).startswith(f"{name}: ")


def test_negative_cancel_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    message = env_error(monkeypatch, "CANCEL_DELAY", "-1")
    assert message.startswith("CANCEL_DELAY: ")
    assert "greater than or equal to 0" in message


def test_overrides_are_checked_like_the_environment() -> None:
    assert config_error(CANCEL_DELAY=-1).startswith("CANCEL_DELAY: ")


def test_admin_emails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADMIN_EMAILS", "a@x.io, b@y.io")
    assert load_settings().ADMIN_EMAILS == ["a@x.io", "b@y.io"]


@pytest.mark.parametrize("value", ["nope", "a@x.io, nope", "@x.io", "a@localhost", "a b@x.io"])
def test_bad_admin_email_names_the_setting(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    message = env_error(monkeypatch, "ADMIN_EMAILS", value)
    assert message.startswith("ADMIN_EMAILS: ")
    assert "not an email address" in message


def test_webhook_secrets_rotation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHOP_WEBHOOK_SECRET", f"{NEW_SECRET} {OLD_SECRET}")
    assert load_settings().webhook_secrets == [NEW_SECRET.encode(), OLD_SECRET.encode()]


def test_webhook_secret_is_raw_bytes_not_base64_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHOP_WEBHOOK_SECRET", f"  {NEW_SECRET}  ")
    assert load_settings().webhook_secrets == [NEW_SECRET.encode()]


@pytest.mark.parametrize(
    "value",
    [
        NEW_SECRET,  # Whop's own shape: ws_ and 48 hex characters
        "ws_" + "a" * 24,  # the shortest accepted
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",  # Standard Webhooks: 24 random bytes, base64
        "0f3a9c27e4b14d8fa6c2b5e8",  # no prefix, 24 characters
    ],
)
def test_a_secret_of_real_length_is_accepted(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("WHOP_WEBHOOK_SECRET", value)
    assert load_settings().webhook_secrets == [value.encode()]


@pytest.mark.parametrize(
    "value",
    ["ws_", "ws_rehearsal", "ws_...", "whsec_c2hvcnQ=", "ws_" + "a" * 23, "0f3a9c27e4b14d8f"],
)
def test_a_webhook_secret_too_short_to_be_real_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    message = env_error(monkeypatch, "WHOP_WEBHOOK_SECRET", value)
    assert message == (
        "WHOP_WEBHOOK_SECRET: is too short to be a real secret: Whop's is ws_ and 48 hex "
        "characters (at least 24 characters after ws_ or whsec_); copy it whole from "
        "Dashboard → Developer → Webhooks"
    )


def test_one_short_secret_among_rotated_ones_is_named_by_its_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    message = env_error(monkeypatch, "WHOP_WEBHOOK_SECRET", f"{NEW_SECRET} ws_old {OLD_SECRET}")
    assert message.startswith(
        "WHOP_WEBHOOK_SECRET: secret 2 of 3 is too short to be a real secret: Whop's is ws_ and "
        "48 hex characters"
    )
    for secret in (NEW_SECRET, "ws_old", OLD_SECRET):
        assert secret not in message  # named by its place, never repeated


def test_every_webhook_secret_we_ship_passes_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulator's default, the demo's, the tests', and every one the docs tell a
    merchant to type (a placeholder such as ws_… aside)."""
    from support.harness import SECRET as TEST_SECRET
    from whop_autocancel.cli.service import simulator
    from whop_autocancel.demo import SECRET as DEMO_SECRET

    shipped = {
        "simulator --webhook-secret default": inspect.signature(simulator)
        .parameters["webhook_secret"]
        .default,
        "demo": DEMO_SECRET,
        "tests": TEST_SECRET,
    }
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        found = re.findall(
            r"(?:WEBHOOK_SECRET=|--webhook-secret |webhook_secret=\")([^\s\"`]+)", text
        )
        for number, value in enumerate(found):
            if not value.endswith(("…", "...")):
                shipped[f"{page.name} #{number + 1}"] = value
    assert "README.md #1" in shipped  # the rehearsal's secret was found
    for where, value in shipped.items():
        monkeypatch.setenv("WHOP_WEBHOOK_SECRET", value)
        try:
            load_settings()
        except ConfigurationError as error:
            raise AssertionError(f"{where}: {value!r} is refused: {error}") from None


def test_blank_webhook_secret_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHOP_WEBHOOK_SECRET", "   ")
    settings = load_settings()
    assert settings.WHOP_WEBHOOK_SECRET is None
    assert settings.webhook_secrets == []


def test_blank_version_date_means_unpinned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHOP_API_VERSION_DATE", " ")
    assert load_settings().uses_versioned_api is False
    monkeypatch.setenv("WHOP_API_VERSION_DATE", "2026-09-29")
    settings = load_settings()
    assert settings.WHOP_API_VERSION_DATE == "2026-09-29"
    assert settings.uses_versioned_api is True


def test_api_url_trailing_slash_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHOP_API_URL", "http://127.0.0.1:8081/api/v1/")
    assert load_settings().WHOP_API_URL == "http://127.0.0.1:8081/api/v1"


def test_log_level_is_upper_cased(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_LEVEL", "debug")
    assert load_settings().LOG_LEVEL == "DEBUG"


def test_smtp_property(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTP_URL", f"smtp://shop:{SMTP_PASSWORD}@mail.example.com:2525")
    smtp = load_settings().smtp
    assert (smtp.host, smtp.port, smtp.username, smtp.password) == (
        "mail.example.com",
        2525,
        "shop",
        SMTP_PASSWORD,
    )


def test_environment_names_are_case_sensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("cancel_delay", "9")
    assert load_settings().CANCEL_DELAY == 5


# ----- .env -----------------------------------------------------------------------------------


def test_dotenv_in_the_working_directory_is_read(clean_environment: Path) -> None:
    (clean_environment / ".env").write_text(
        f"CANCEL_DELAY=7\nWHOP_WEBHOOK_SECRET={NEW_SECRET}\nRETRY_SCHEDULE=3,6\n", encoding="utf-8"
    )
    settings = load_settings()
    assert settings.CANCEL_DELAY == 7
    assert settings.webhook_secrets == [NEW_SECRET.encode()]
    assert settings.RETRY_SCHEDULE == [3, 6]


def test_environment_wins_over_dotenv(
    clean_environment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (clean_environment / ".env").write_text("CANCEL_DELAY=7\n", encoding="utf-8")
    monkeypatch.setenv("CANCEL_DELAY", "8")
    assert load_settings().CANCEL_DELAY == 8


def test_invalid_dotenv_value_names_the_setting(clean_environment: Path) -> None:
    (clean_environment / ".env").write_text("MATCH_WINDOW=ten minutes\n", encoding="utf-8")
    assert config_error().startswith("MATCH_WINDOW: ")


# ----- required settings ----------------------------------------------------------------------


def test_require_runtime_names_every_missing_setting_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected_order = ["WHOP_API_KEY", "WHOP_WEBHOOK_SECRET", "ADMIN_EMAILS", "MAIL_FROM"]
    values = {
        "WHOP_API_KEY": API_KEY,
        "WHOP_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "ADMIN_EMAILS": "ops@example.com",
        "MAIL_FROM": "shop@example.com",
    }
    with pytest.raises(ConfigurationError) as caught:
        load_settings().require_runtime()
    lines = str(caught.value).splitlines()
    assert lines[0] == "4 settings to fix:"
    assert [line.split()[0] for line in lines[1:]] == expected_order
    assert all(line.startswith("  ") and " is not set: " in line for line in lines[1:])
    for name in expected_order[:-1]:
        monkeypatch.setenv(name, values[name])
    with pytest.raises(ConfigurationError) as caught:
        load_settings().require_runtime()
    message = str(caught.value)  # one left: one line, as before
    assert message.startswith("MAIL_FROM is not set: ")
    assert "\n" not in message
    monkeypatch.setenv("MAIL_FROM", values["MAIL_FROM"])
    load_settings().require_runtime()


def test_invalid_and_missing_settings_are_named_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANCEL_DELAY", "-1")
    monkeypatch.setenv("ADMIN_EMAILS", "nobody")
    monkeypatch.setenv("WHOP_WEBHOOK_SECRET", WEBHOOK_SECRET)
    with pytest.raises(ConfigurationError) as caught:
        load_settings(required=("WHOP_API_KEY", "WHOP_WEBHOOK_SECRET", "ADMIN_EMAILS", "MAIL_FROM"))
    lines = str(caught.value).splitlines()
    assert lines[0] == "4 settings to fix:"
    assert [line.strip().split(":")[0] for line in lines[1:]] == [
        "CANCEL_DELAY",
        "ADMIN_EMAILS",  # invalid, and not also reported as missing
        "WHOP_API_KEY is not set",
        "MAIL_FROM is not set",
    ]


def test_what_listing_at_whop_needs_depends_on_the_api_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings(required=lambda settings: settings.whop_listing_settings)
    assert "WHOP_API_KEY is not set" in str(caught.value)
    assert "WHOP_COMPANY_ID is not set" in str(caught.value)
    monkeypatch.setenv("WHOP_API_VERSION_DATE", "2025-01-01")
    with pytest.raises(ConfigurationError) as caught:
        load_settings(required=lambda settings: settings.whop_listing_settings)
    assert str(caught.value).startswith("WHOP_API_KEY is not set: ")


def test_require_names_company_id() -> None:
    with pytest.raises(ConfigurationError, match=r"^WHOP_COMPANY_ID is not set: .*biz_"):
        load_settings().require("WHOP_COMPANY_ID")


# ----- secrets never in messages --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CANCEL_DELAY", "-1"),
        ("ADMIN_EMAILS", "nope"),
        ("SMTP_URL", f"smtp://shop:{SMTP_PASSWORD}@mail.example.com?unknown=1"),
        ("SMTP_URL", f"smtps://shop:{SMTP_PASSWORD}@mail.example.com?starttls=required"),
        ("SMTP_URL", f"smtp://shop:{SMTP_PASSWORD}@mail.example.com:99999"),
        ("SMTP_URL", f"ftp://shop:{SMTP_PASSWORD}@mail.example.com"),
        ("WHOP_API_URL", "nope"),
    ],
)
def test_error_message_never_contains_a_secret(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv("WHOP_API_KEY", API_KEY)
    monkeypatch.setenv("WHOP_WEBHOOK_SECRET", WEBHOOK_SECRET)
    message = env_error(monkeypatch, name, value)
    assert message.startswith(f"{name}: ")
    for secret in (API_KEY, WEBHOOK_SECRET, SMTP_PASSWORD, "DISTINCTIVE"):
        assert secret not in message


def test_secrets_are_not_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHOP_API_KEY", API_KEY)
    monkeypatch.setenv("WHOP_WEBHOOK_SECRET", WEBHOOK_SECRET)
    monkeypatch.setenv("SMTP_URL", f"smtp://shop:{SMTP_PASSWORD}@mail.example.com")
    text = repr(load_settings()) + str(load_settings())
    for secret in (API_KEY, WEBHOOK_SECRET, SMTP_PASSWORD):
        assert secret not in text


# ----- metrics and the access log --------------------------------------------------------------

METRICS_TOKEN = "DISTINCTIVE-metrics-token-5e2a9c"


def test_metrics_are_off_and_the_access_log_quiet_by_default() -> None:
    settings = load_settings()
    assert settings.METRICS_TOKEN is None
    assert settings.ACCESS_LOG is False


def test_metrics_token_and_access_log_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METRICS_TOKEN", METRICS_TOKEN)
    monkeypatch.setenv("ACCESS_LOG", "true")
    settings = load_settings()
    assert settings.METRICS_TOKEN is not None
    assert settings.METRICS_TOKEN.get_secret_value() == METRICS_TOKEN
    assert settings.ACCESS_LOG is True
    assert METRICS_TOKEN not in repr(settings) + str(settings)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("DISTINCTIVE-15c", "at least 16 characters"),
        ("DISTINCTIVE with spaces inside", "must not contain spaces"),
    ],
)
def test_a_weak_metrics_token_is_refused_without_repeating_it(
    monkeypatch: pytest.MonkeyPatch, value: str, says: str
) -> None:
    message = env_error(monkeypatch, "METRICS_TOKEN", value)
    assert message.startswith("METRICS_TOKEN: ")
    assert says in message
    assert "DISTINCTIVE" not in message


def test_a_blank_metrics_token_means_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METRICS_TOKEN", "   ")
    assert load_settings().METRICS_TOKEN is None


# ----- cross-field: the lease ------------------------------------------------------------------


@pytest.mark.parametrize(("lease", "timeout"), [("20", "10"), ("19", "10"), ("5", "10")])
def test_lease_not_more_than_twice_the_timeout_fails(
    monkeypatch: pytest.MonkeyPatch, lease: str, timeout: str
) -> None:
    monkeypatch.setenv("CANCEL_LEASE", lease)
    monkeypatch.setenv("WHOP_TIMEOUT", timeout)
    message = config_error()
    assert "CANCEL_LEASE" in message
    assert "WHOP_TIMEOUT" in message


def test_lease_just_over_twice_the_timeout_is_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANCEL_LEASE", "20.5")
    monkeypatch.setenv("WHOP_TIMEOUT", "10")
    assert load_settings().CANCEL_LEASE == 20.5


def test_lease_error_starts_with_the_setting_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANCEL_LEASE", "20")
    monkeypatch.setenv("WHOP_TIMEOUT", "10")
    assert config_error().startswith("CANCEL_LEASE")


# ----- the dashboard ---------------------------------------------------------------------------

# argon2id of "correct horse battery staple" (low cost: a test vector, never a real password).
ADMIN_HASH = (
    "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0$tCc9fRe1ZCo/16K285DQzyaDkBqT0FS+sUtZTyzbH18"
)
SESSION_SECRET = "DISTINCTIVE-session-secret-0123456789abcdef"


def test_the_dashboard_is_off_by_default() -> None:
    settings = load_settings()
    assert settings.ADMIN_PASSWORD_HASH is None
    assert settings.dashboard_enabled is False
    assert settings.ADMIN_SESSION_MAX_AGE == 43200
    assert settings.ADMIN_LOGIN_MAX_FAILURES == 5
    assert settings.ADMIN_LOGIN_WINDOW == 900


def test_a_password_hash_and_a_session_secret_turn_the_dashboard_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ADMIN_PASSWORD_HASH", ADMIN_HASH)
    monkeypatch.setenv("ADMIN_SESSION_SECRET", SESSION_SECRET)
    settings = load_settings()
    assert settings.dashboard_enabled is True
    assert SESSION_SECRET not in repr(settings) + str(settings)


def test_a_password_hash_from_dotenv_keeps_its_dollar_signs(clean_environment: Path) -> None:
    (clean_environment / ".env").write_text(
        f"ADMIN_PASSWORD_HASH={ADMIN_HASH}\nADMIN_SESSION_SECRET={SESSION_SECRET}\n",
        encoding="utf-8",
    )
    settings = load_settings()
    assert settings.ADMIN_PASSWORD_HASH is not None
    assert settings.ADMIN_PASSWORD_HASH.get_secret_value() == ADMIN_HASH


def test_a_password_hash_without_a_session_secret_stops_with_what_to_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ADMIN_PASSWORD_HASH", ADMIN_HASH)
    message = config_error()
    assert message.startswith("ADMIN_SESSION_SECRET")
    assert "admin set-password" in message


@pytest.mark.parametrize("value", ["hunter2", "$2b$12$abcdefghijklmnopqrstuv", "$argon2id$nope"])
def test_a_password_hash_that_is_not_argon2_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("ADMIN_SESSION_SECRET", SESSION_SECRET)
    message = env_error(monkeypatch, "ADMIN_PASSWORD_HASH", value)
    assert message.startswith("ADMIN_PASSWORD_HASH: ")
    assert "admin set-password" in message
    assert value not in message


def test_a_short_session_secret_is_refused_without_repeating_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ADMIN_PASSWORD_HASH", ADMIN_HASH)
    message = env_error(monkeypatch, "ADMIN_SESSION_SECRET", "DISTINCTIVE-short")
    assert message.startswith("ADMIN_SESSION_SECRET: ")
    assert "DISTINCTIVE" not in message
