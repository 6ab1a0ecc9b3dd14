"""Secrets at rest (`whop_autocancel.sealing`): Fernet round trips, keyed fingerprints, key
rotation, and errors that help without ever showing a key or a secret."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from whop_autocancel.errors import ConfigurationError, WhopAutocancelError
from whop_autocancel.sealing import Sealer, SealError, generate_key
from whop_autocancel.settings import Settings, load_settings

OLD = "TyjXqm3540C7ZKIhDUizLMzTcmCByiRbCwTGU4w4hfY="  # the harness's fixed test key
NEW = "Wx3vdSHZNI-LAHFR_UhguNKeRdu3sUaA9KxGhjwLcJI="  # from `stock keygen`
ITEM = "player_7781@game.example:Hunter2-DISTINCTIVE"


def test_a_sealed_item_opens_to_the_same_text() -> None:
    sealer = Sealer(OLD)
    for text in (
        ITEM,
        "",
        "  spaces kept  ",
        "Ünïcødé — 鍵 🔑 ключ",
        "login: someone\npassword: p@ss\r\nrecovery: 12 words\n",
        "x" * 10_000,
    ):
        token = sealer.seal(text)
        assert text == sealer.open(token)
        assert not text.strip() or text not in token
        assert token.isascii()


def test_each_seal_is_a_new_token_but_the_fingerprint_is_stable() -> None:
    sealer = Sealer(OLD)
    first, second = sealer.seal(ITEM), sealer.seal(ITEM)
    assert first != second  # a random IV each time: equal items are not visible as equal
    assert sealer.open(first) == sealer.open(second) == ITEM
    assert sealer.fingerprint(ITEM) == sealer.fingerprint(ITEM) == Sealer(OLD).fingerprint(ITEM)
    fingerprint = sealer.fingerprint(ITEM)
    assert len(fingerprint) == 64
    int(fingerprint, 16)  # hex
    assert sealer.fingerprint(ITEM + " ") != fingerprint
    assert sealer.fingerprint(ITEM.upper()) != fingerprint


def test_the_fingerprint_depends_on_the_key() -> None:
    # Without the key, nobody holding the database can check whether it has a given account.
    assert Sealer(OLD).fingerprint(ITEM) != Sealer(NEW).fingerprint(ITEM)
    assert Sealer(OLD).fingerprint(ITEM) != hashlib.sha256(ITEM.encode()).hexdigest()


def test_rotation_the_first_key_seals_and_every_key_opens() -> None:
    old_token = Sealer(OLD).seal(ITEM)
    rotated = Sealer(f"{NEW} {OLD}")
    assert rotated.open(old_token) == ITEM  # stored before the rotation
    new_token = rotated.seal(ITEM)
    assert Sealer(NEW).open(new_token) == ITEM  # sealed with the first key…
    with pytest.raises(SealError):
        Sealer(OLD).open(new_token)  # …not with the old one
    # Whitespace of any kind separates keys (an .env line, a secret manager's newline).
    assert Sealer(f"  {NEW}\n\t{OLD} ").open(old_token) == ITEM


def test_rotation_fingerprints_lists_every_keys_fingerprint_first_key_first() -> None:
    rotated = Sealer(f"{NEW} {OLD}")
    assert rotated.fingerprints(ITEM) == [
        Sealer(NEW).fingerprint(ITEM),
        Sealer(OLD).fingerprint(ITEM),
    ]
    assert rotated.fingerprint(ITEM) == Sealer(NEW).fingerprint(ITEM)
    assert Sealer(OLD).fingerprints(ITEM) == [Sealer(OLD).fingerprint(ITEM)]


def test_the_wrong_key_is_a_seal_error_that_explains_and_shows_nothing() -> None:
    token = Sealer(OLD).seal(ITEM)
    with pytest.raises(SealError) as caught:
        Sealer(NEW).open(token)
    message = str(caught.value)
    assert isinstance(caught.value, WhopAutocancelError)  # the CLI prints it as one line
    assert "STOCK_ENCRYPTION_KEY" in message
    assert "old key after the new one" in message
    assert "\n" not in message
    for secret in (ITEM, "Hunter2", OLD, NEW):
        assert secret not in message
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__  # `from None`: no InvalidToken chained


@pytest.mark.parametrize(
    "token",
    [
        "not a token",
        "",
        "gAAAAA" + "A" * 100,
        "ünïcode-token",
        Sealer(OLD).seal(ITEM)[:-4],  # truncated
    ],
)
def test_a_damaged_token_is_a_seal_error(token: str) -> None:
    with pytest.raises(SealError, match="cannot be decrypted"):
        Sealer(OLD).open(token)


def test_a_tampered_token_is_refused() -> None:
    token = Sealer(OLD).seal(ITEM)
    raw = bytearray(base64.urlsafe_b64decode(token))
    raw[-40] ^= 1  # flip one bit of the ciphertext: the HMAC no longer matches
    with pytest.raises(SealError):
        Sealer(OLD).open(base64.urlsafe_b64encode(bytes(raw)).decode())


def test_a_token_that_is_not_utf8_inside_is_a_seal_error() -> None:
    token = Fernet(OLD.encode()).encrypt(b"\xff\xfe not utf-8").decode()
    with pytest.raises(SealError):
        Sealer(OLD).open(token)


@pytest.mark.parametrize(
    ("keys", "position"),
    [
        ("not-a-key", 1),
        (OLD[:-2], 1),  # missing padding
        (OLD[:-1] + "AAAA", 1),  # 47 characters: not 32 bytes
        (base64.urlsafe_b64encode(b"k" * 16).decode(), 1),  # 16 bytes: AES-128 alone
        (f"{OLD} oops", 2),
        (f"{NEW} {OLD} {OLD[:43]}", 3),
        ("••••••••", 1),
    ],
)
def test_a_malformed_key_names_the_setting_and_keygen(keys: str, position: int) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Sealer(keys)
    message = str(caught.value)
    assert message.startswith("STOCK_ENCRYPTION_KEY: ")
    assert f"key {position} is not a Fernet key" in message
    assert "whop-autocancel stock keygen" in message
    for part in keys.split():
        assert part not in message  # never echo what may be a real key


@pytest.mark.parametrize("keys", ["", "   ", "\n\t"])
def test_no_key_at_all_is_a_configuration_error(keys: str) -> None:
    with pytest.raises(ConfigurationError, match="STOCK_ENCRYPTION_KEY is empty"):
        Sealer(keys)


def test_repr_shows_how_many_keys_but_never_a_key() -> None:
    sealer = Sealer(f"{NEW} {OLD}")
    assert repr(sealer) == str(sealer) == "Sealer(keys=2)"
    assert f"{[sealer]}" == "[Sealer(keys=2)]"
    assert repr(Sealer(OLD)) == "Sealer(keys=1)"


def test_generate_key_gives_a_new_working_key_each_time() -> None:
    keys = {generate_key() for _ in range(5)}
    assert len(keys) == 5
    for key in keys:
        assert len(key) == 44
        assert len(base64.urlsafe_b64decode(key)) == 32
        Fernet(key.encode())  # cryptography's own check
        sealer = Sealer(key)
        assert sealer.open(sealer.seal(ITEM)) == ITEM
        assert load_settings(_env_file=None, STOCK_ENCRYPTION_KEY=key).sealer is not None


# Settings -----------------------------------------------------------------------------------


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No setting leaks in from the real environment or a real `.env`."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.mark.usefixtures("clean_environment")
@pytest.mark.parametrize(
    "value",
    ["not-a-key", OLD[:-1], f"{OLD} {OLD[:20]}", "aGVsbG8="],
)
def test_load_settings_refuses_a_bad_stock_key_in_one_line(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("STOCK_ENCRYPTION_KEY", value)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith("STOCK_ENCRYPTION_KEY: key ")
    assert "is not a Fernet key" in message
    assert "whop-autocancel stock keygen" in message
    assert "\n" not in message
    for part in value.split():
        assert part not in message


@pytest.mark.usefixtures("clean_environment")
def test_load_settings_with_good_keys_gives_a_sealer_and_hides_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STOCK_ENCRYPTION_KEY", f"{NEW} {OLD}")
    settings = load_settings()
    sealer = settings.sealer
    assert sealer is not None
    assert sealer.open(Sealer(OLD).seal(ITEM)) == ITEM
    assert sealer.fingerprint(ITEM) == Sealer(NEW).fingerprint(ITEM)
    assert NEW not in repr(settings)
    assert OLD not in repr(settings)


@pytest.mark.usefixtures("clean_environment")
@pytest.mark.parametrize("value", [None, "", "   "])
def test_no_stock_key_means_no_sealer(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is not None:
        monkeypatch.setenv("STOCK_ENCRYPTION_KEY", value)
    settings = load_settings()
    assert settings.STOCK_ENCRYPTION_KEY is None
    assert settings.sealer is None
    with pytest.raises(ConfigurationError) as caught:
        settings.require("STOCK_ENCRYPTION_KEY")
    assert "whop-autocancel stock keygen" in str(caught.value)
