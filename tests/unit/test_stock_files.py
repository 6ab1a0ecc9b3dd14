"""Reading stock files (`stock import`'s parser): one item per line, or one column of a CSV
file; blanks and repeats counted; every refusal a clear `StockError` that names the problem
(and never echoes the items)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from whop_autocancel.delivery.stock import (
    MAX_ITEM_CHARS,
    MaskedItem,
    ParsedItems,
    StockError,
    items_for,
    mask,
    read_items,
)
from whop_autocancel.errors import WhopAutocancelError


def write(tmp_path: Path, data: bytes | str, name: str = "items.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def parsed(items: list[str], blank: int = 0, repeated: int = 0) -> ParsedItems:
    return ParsedItems(items=items, blank=blank, duplicate_in_file=repeated)


def refusal(path: Path, **options: object) -> str:
    with pytest.raises(StockError) as caught:
        read_items(path, **options)  # type: ignore[arg-type]
    assert isinstance(caught.value, WhopAutocancelError)  # the CLI prints it, exit 1
    message = str(caught.value)
    assert "\n" not in message
    return message


# One item per line ---------------------------------------------------------------------------


def test_lines_are_stripped_and_blanks_and_repeats_are_counted(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "KEY-AAAA\n"
        "\n"
        "   KEY-BBBB  \n"  # surrounding whitespace is not part of the item
        "KEY-AAAA\n"  # repeated
        "\t \n"  # blank (whitespace only)
        " KEY-AAAA\t\n"  # repeated once stripped
        "user@example.com:pa ss word\n"  # inner spaces are kept
        "KEY-CCCC",  # no newline at the end
    )
    assert read_items(path) == parsed(
        ["KEY-AAAA", "KEY-BBBB", "user@example.com:pa ss word", "KEY-CCCC"], blank=2, repeated=2
    )


def test_items_keep_the_order_of_the_file(tmp_path: Path) -> None:
    keys = [f"KEY-{n:03d}" for n in (5, 1, 4, 2, 3)]
    assert read_items(write(tmp_path, "\n".join(keys) + "\n")).items == keys


def test_windows_line_endings(tmp_path: Path) -> None:
    path = write(tmp_path, b"KEY-1\r\nKEY-2\r\n\r\nKEY-1\r\nKEY-3\r\n")
    result = read_items(path)
    assert result == parsed(["KEY-1", "KEY-2", "KEY-3"], blank=1, repeated=1)
    assert not any("\r" in item for item in result.items)


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_item(tmp_path: Path) -> None:
    path = write(tmp_path, "\ufeffKEY-1\nKEY-2\n".encode())
    assert read_items(path).items == ["KEY-1", "KEY-2"]


def test_unicode_items(tmp_path: Path) -> None:
    path = write(tmp_path, "jürgen@example.de:pässwörd\n鍵-001\nключ 🔑\n")
    assert read_items(path).items == ["jürgen@example.de:pässwörd", "鍵-001", "ключ 🔑"]


@pytest.mark.parametrize("content", ["", "\n", "\n\n  \n", "\r\n"])
def test_an_empty_file_gives_no_items(tmp_path: Path, content: str) -> None:
    result = read_items(write(tmp_path, content))
    assert result.items == []
    assert result.duplicate_in_file == 0


def test_only_line_breaks_separate_items(tmp_path: Path) -> None:
    # str.splitlines() would also split on \x0b \x0c \x1c-\x1e \x85 \u2028 \u2029, cutting
    # one account in two; only \n, \r\n and \r end a line.
    path = write(tmp_path, "user:pa\x0css\nname\u2028line\r\nnext\x85line\rlast\x1ditem\n")
    assert read_items(path) == parsed(
        ["user:pa\x0css", "name\u2028line", "next\x85line", "last\x1ditem"]
    )


# CSV ---------------------------------------------------------------------------------------

ACCOUNTS = (
    "email,password,note\n"
    "a@example.com,pw-a,first\n"
    "b@example.com,pw-b,second\n"
    "\n"
    "a@example.com,pw-a2,repeat of the email\n"
    " ,pw-c,blank email\n"
)


def test_csv_column_by_header_name(tmp_path: Path) -> None:
    path = write(tmp_path, ACCOUNTS, "accounts.csv")
    assert read_items(path, column="email") == parsed(
        ["a@example.com", "b@example.com"], blank=2, repeated=1
    )
    assert read_items(path, column="password") == parsed(["pw-a", "pw-b", "pw-a2", "pw-c"], blank=1)


def test_csv_header_names_are_matched_after_stripping_spaces(tmp_path: Path) -> None:
    path = write(tmp_path, " email , password \nx@example.com,pw\n")
    assert read_items(path, column="password").items == ["pw"]


def test_csv_column_by_number_skips_the_header_row(tmp_path: Path) -> None:
    path = write(tmp_path, ACCOUNTS, "accounts.csv")
    assert read_items(path, column="2").items == ["pw-a", "pw-b", "pw-a2", "pw-c"]
    assert read_items(path, column="1") == read_items(path, column="email")


def test_csv_without_a_header_row_by_number(tmp_path: Path) -> None:
    path = write(tmp_path, "a@example.com,pw-a\nb@example.com,pw-b\n", "accounts.csv")
    assert read_items(path, column="1", header=False).items == ["a@example.com", "b@example.com"]
    assert read_items(path, column="2", header=False).items == ["pw-a", "pw-b"]
    # With the default (header=True) the first row would be taken for the header:
    assert read_items(path, column="2").items == ["pw-b"]


def test_csv_without_a_header_row_needs_a_number(tmp_path: Path) -> None:
    path = write(tmp_path, "a@example.com,pw-a\n", "accounts.csv")
    message = refusal(path, column="email", header=False)
    assert "--column must be a number when the file has no header row" in message


def test_csv_columns_count_from_one(tmp_path: Path) -> None:
    path = write(tmp_path, "a,b\n1,2\n", "accounts.csv")
    assert refusal(path, column="0") == "--column counts from 1"


def test_csv_quoted_fields_keep_delimiters_quotes_and_newlines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "login,secret\n"
        'one,"has, commas"\n'
        'two,"line one\nline two"\n'
        'three,"say ""hi"""\n'
        'four,"crlf\r\ninside"\r\n',
        "accounts.csv",
    )
    assert read_items(path, column="secret").items == [
        "has, commas",
        "line one\nline two",
        'say "hi"',
        "crlf\ninside",
    ]
    assert read_items(path, column="login").items == ["one", "two", "three", "four"]


def test_csv_with_a_semicolon_or_tab_delimiter(tmp_path: Path) -> None:
    semicolons = write(tmp_path, "user;key\nann;K-1,with-comma\nbob;K-2\n", "semi.csv")
    assert read_items(semicolons, column="key", delimiter=";").items == ["K-1,with-comma", "K-2"]
    tabs = write(tmp_path, "user\tkey\nann\tK-1\n", "tabs.tsv")
    assert read_items(tabs, column="key", delimiter="\t").items == ["K-1"]
    # The wrong delimiter: the whole line is one column, so the name is not found.
    message = refusal(semicolons, column="key")
    assert "columns: user;key" in message


def test_csv_crlf_and_bom(tmp_path: Path) -> None:
    path = write(tmp_path, "\ufeffkey,owner\r\nK-1,ann\r\nK-2,bob\r\n".encode(), "excel.csv")
    assert read_items(path, column="key").items == ["K-1", "K-2"]  # "\ufeffkey" would not match
    assert read_items(path, column="owner").items == ["ann", "bob"]


def test_a_missing_column_name_lists_the_columns(tmp_path: Path) -> None:
    path = write(tmp_path, ACCOUNTS, "accounts.csv")
    message = refusal(path, column="passwd")
    assert message == (f"{path}: no column 'passwd' in the header (columns: email, password, note)")
    assert "pw-a" not in message


def test_a_missing_column_in_an_empty_csv(tmp_path: Path) -> None:
    path = write(tmp_path, "", "empty.csv")
    assert "(columns: -)" in refusal(path, column="email")
    assert read_items(path, column="1") == parsed([])


def test_a_short_row_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "email,password\na@example.com,pw-a\nb@example.com\n", "short.csv")
    message = refusal(path, column="password")
    assert message == f"{path}: row 3 has no column password"
    assert "b@example.com" not in message
    assert refusal(path, column="2") == f"{path}: row 3 has no column 2"
    no_header = write(tmp_path, "a@example.com,pw\nb@example.com\n", "short2.csv")
    assert refusal(no_header, column="2", header=False) == f"{no_header}: row 2 has no column 2"


def test_an_unterminated_quote_is_refused_not_merged_into_one_item(tmp_path: Path) -> None:
    # A stray quote would otherwise swallow every following row into one "item", which one
    # customer would then receive (every account after the quote).
    path = write(
        tmp_path, 'email,password\na@example.com,"pw-a\nb@example.com,pw-b\n', "broken.csv"
    )
    message = refusal(path, column="password")
    assert message.startswith(f"{path}: not valid CSV: ")
    assert "pw-" not in message


def test_a_field_over_the_csv_limit_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "key\n" + "k" * 200_000 + "\n", "huge.csv")
    assert refusal(path, column="key").startswith(f"{path}: not valid CSV: field larger")


# Positions (for a dry run's report) -----------------------------------------------------------


def test_each_item_and_repeat_keeps_its_line(tmp_path: Path) -> None:
    result = read_items(write(tmp_path, "KEY-1\n\n KEY-2\nKEY-1\nKEY-3\nKEY-2\n"))
    assert result.unit == "line"
    assert list(zip(result.positions, result.items, strict=True)) == [
        (1, "KEY-1"),
        (3, "KEY-2"),
        (5, "KEY-3"),
    ]
    assert result.repeats == [(4, 1), (6, 3)]


def test_csv_items_are_placed_by_row(tmp_path: Path) -> None:
    path = write(tmp_path, 'key,owner\nK-1,ann\n"K-\n2",bob\n\nK-1,carl\n', "keys.csv")
    with_header = read_items(path, column="key")
    assert with_header.unit == "row"
    assert with_header.positions == [2, 3]  # a record, however many lines it spans
    assert with_header.repeats == [(5, 2)]
    no_header = read_items(path, column="1", header=False)
    assert no_header.positions == [1, 2, 3]  # "key" is an item now
    assert no_header.repeats == [(5, 2)]


def test_a_masked_item_shows_two_characters_of_a_long_item_and_none_of_a_short_one() -> None:
    assert mask("# Installation", 4) == MaskedItem(position=4, begins="# ", length=14)
    assert mask("ABCDEFGH", 1) == MaskedItem(position=1, begins="AB", length=8)
    assert mask("ABCDEFG", 1) == MaskedItem(position=1, begins="", length=7)
    assert mask("a\x1b[31mred", 2).begins == "a?"  # no terminal escape reaches the screen
    assert mask("鍵🔑-0001-XYZ", 3) == MaskedItem(position=3, begins="鍵🔑", length=11)


# Refusals ----------------------------------------------------------------------------------


def test_an_entry_too_long_to_be_an_item(tmp_path: Path) -> None:
    fine = "k" * MAX_ITEM_CHARS
    assert read_items(write(tmp_path, f"{fine}\n", "fine.txt")).items == [fine]
    long = write(tmp_path, f"KEY-1\n\n{fine}k\n", "long.txt")
    message = refusal(long)
    assert message == (
        f"{long}: entry 3 is {MAX_ITEM_CHARS + 1} characters long (at most {MAX_ITEM_CHARS}); "
        "is this the right file or column?"
    )
    # Whitespace around it does not count.
    padded = write(tmp_path, f"   {fine}   \n", "padded.txt")
    assert read_items(padded).items == [fine]


def test_an_entry_too_long_in_a_csv_column(tmp_path: Path) -> None:
    path = write(tmp_path, "key,blob\nK-1," + "b" * (MAX_ITEM_CHARS + 1) + "\n", "blob.csv")
    assert read_items(path, column="key").items == ["K-1"]
    assert f"is {MAX_ITEM_CHARS + 1} characters long" in refusal(path, column="blob")


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = write(tmp_path, "KEY-1\nmüller:pässword\n".encode("latin-1"), "latin1.txt")
    message = refusal(path)
    assert message == f"{path} is not UTF-8 (byte 7); save it as UTF-8"  # 0-based offset
    assert refusal(path, column="1").startswith(f"{path} is not UTF-8")


def test_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.txt"
    assert refusal(path) == f"{path} does not exist"
    assert refusal(path, column="email") == f"{path} does not exist"


def test_a_directory_is_not_a_file(tmp_path: Path) -> None:
    assert refusal(tmp_path).startswith(f"cannot read {tmp_path}: ")


# items_for ---------------------------------------------------------------------------------


def test_items_for_names_where_the_long_entry_is() -> None:
    with pytest.raises(StockError, match=r"^keys\.csv: entry 2 is"):
        items_for(["ok", "x" * (MAX_ITEM_CHARS + 1)], where="keys.csv")
    with pytest.raises(StockError, match=r"^input: entry 1 is"):
        items_for(["x" * (MAX_ITEM_CHARS + 1)])


entries = st.lists(
    st.one_of(
        st.text(max_size=30),
        st.sampled_from(["", " ", "\t", "KEY-1", " KEY-1 ", "KEY-1\n", "\u00a0KEY-2"]),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(values=entries)
@example(values=["KEY-1", " KEY-1", "", "  ", "KEY-2", "KEY-1\t"])
def test_items_for_accounts_for_every_entry(values: list[str]) -> None:
    result = items_for(values)
    # Every entry is either added, blank or a repeat: nothing is lost or invented.
    assert len(result.items) + result.blank + result.duplicate_in_file == len(values)
    assert result.blank == sum(1 for value in values if not value.strip())
    # Items are stripped, non-empty, unique, and in first-seen order.
    assert all(item == item.strip() and item for item in result.items)
    assert len(set(result.items)) == len(result.items)
    first_seen = list(dict.fromkeys(value.strip() for value in values if value.strip()))
    assert result.items == first_seen


line_text = st.text(
    # Anything but the line ends and a leading byte-order mark (which utf-8-sig drops).
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\n\r\ufeff"),
    max_size=20,
)


@settings(max_examples=100, deadline=None)
@given(values=st.lists(line_text, min_size=1, max_size=20))
def test_a_file_reads_like_items_for_its_lines(
    tmp_path_factory: pytest.TempPathFactory, values: list[str]
) -> None:
    path = tmp_path_factory.mktemp("lines") / "items.txt"
    path.write_bytes(("\n".join(values) + "\n").encode())
    assert read_items(path) == items_for(values)


def test_a_column_that_is_a_non_ascii_digit_is_a_header_name(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(StockError, match="no column '²'"):
        read_items(path, column="²")
