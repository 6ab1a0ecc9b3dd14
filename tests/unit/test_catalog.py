"""The merchant's catalog: loading, one-line errors with file:line, sandboxed templates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from whop_autocancel.catalog import (
    Catalog,
    CatalogPlan,
    compiled,
    load_catalog,
    parse_catalog,
)
from whop_autocancel.delivery.methods import known_methods
from whop_autocancel.errors import ConfigurationError

EXAMPLE = Path(__file__).resolve().parents[2] / "catalog.example.toml"
KNOWN = known_methods()
FILE = Path("shop/catalog.toml")


def catalog_error(text: str) -> str:
    with pytest.raises(ConfigurationError) as caught:
        parse_catalog(text, KNOWN, FILE)
    message = str(caught.value)
    assert "\n" not in message
    return message


def one_plan(**keys: str) -> CatalogPlan:
    body = "\n".join(f"{key} = {value}" for key, value in keys.items())
    return parse_catalog(f"[plans.plan_A]\n{body}\n", KNOWN).plans["plan_A"]


# ----- the shipped example --------------------------------------------------------------------


def test_known_methods() -> None:
    assert {"message", "none"} <= KNOWN


def test_shipped_example_loads() -> None:
    catalog = load_catalog(EXAMPLE, KNOWN)
    assert catalog.path == EXAMPLE
    assert sorted(catalog.plans) == ["plan_Bq2Wx9Zt4KmNr", "plan_ServiceSetupOnce"]
    pack = catalog.plans["plan_Bq2Wx9Zt4KmNr"]
    assert pack.name == "Example Download Pack"
    assert pack.delivery == pack.method == "message"
    assert pack.link == "https://example.com/downloads/pack"
    assert pack.cancel is True
    assert "Thank you for your purchase!" in pack.message
    assert pack.render_subject(plan_name=pack.name) == "Your download: Example Download Pack"
    setup = catalog.plans["plan_ServiceSetupOnce"]
    assert setup.delivery == "none"
    assert setup.cancel is True
    assert setup.subject == "Your purchase: One-off setup call"


def test_catalog_lookup() -> None:
    catalog = load_catalog(EXAMPLE, KNOWN)
    assert catalog.is_listed("plan_Bq2Wx9Zt4KmNr")
    assert not catalog.is_listed("plan_NotListed")
    assert not catalog.is_listed(None)
    assert catalog.get("") is None


def test_empty_catalog_lists_nothing() -> None:
    catalog = parse_catalog("# nothing sold yet\n", KNOWN)
    assert catalog == Catalog(path=None, plans={})


# ----- defaults and rendering -----------------------------------------------------------------


def test_defaults() -> None:
    plan = one_plan(delivery='"none"')
    assert plan.cancel is True
    assert plan.name == "plan_A"
    assert plan.subject == "Your purchase: plan_A"
    assert plan.message == ""
    assert plan.link is None


def test_cancel_false() -> None:
    assert one_plan(delivery='"none"', cancel="false").cancel is False


def test_render_message_substitutes_order_id() -> None:
    plan = one_plan(delivery='"message"', message='"Your order is {{ order_id }}."')
    assert plan.render_message(order_id="ord_000123") == "Your order is ord_000123."


def test_merchant_text_is_not_html_escaped() -> None:
    plan = one_plan(delivery='"message"', message='"Hi {{ email }} & <b>thanks</b>"')
    assert plan.render_message(email="a<b>@x.io") == "Hi a<b>@x.io & <b>thanks</b>"


def test_a_typo_in_a_variable_stops_loading() -> None:
    """A typo must not mail customers a blank: the catalog is rejected at start-up."""
    text = '[plans.plan_A]\ndelivery = "message"\nmessage = "Order: [{{ ordr_id }}]"\n'
    with pytest.raises(ConfigurationError, match="'ordr_id' is undefined"):
        parse_catalog(text, KNOWN, FILE)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ order_id.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ ''.__class__.__base__.__subclasses__() }}",
    ],
)
def test_merchant_template_is_sandboxed(template: str) -> None:
    text = f'[plans.plan_A]\ndelivery = "message"\nmessage = "{template}"\n'
    with pytest.raises(ConfigurationError, match=r"not a valid template: .*unsafe"):
        parse_catalog(text, KNOWN, FILE)


def test_single_unsafe_attribute_is_refused() -> None:
    text = '[plans.plan_A]\ndelivery = "message"\nmessage = "[{{ \'\'.__class__ }}]"\n'
    with pytest.raises(ConfigurationError, match="not a valid template"):
        parse_catalog(text, KNOWN, FILE)


# ----- errors with file:line ------------------------------------------------------------------


def assert_at(message: str, line: int, reason: str) -> None:
    assert message.startswith(f"{FILE}:{line}: "), message
    assert reason in message


def test_unknown_delivery_method() -> None:
    text = '\n[plans.plan_A]\ndelivery = "none"\n\n[plans.plan_B]\ndelivery = "carrier_pigeon"\n'
    message = catalog_error(text)
    assert_at(message, 5, "unknown delivery method 'carrier_pigeon'")
    assert "plan_B" in message
    assert "message, none, stock" in message


def test_stock_plan_names_its_pool() -> None:
    catalog = parse_catalog(
        '[plans.plan_A]\ndelivery = "stock:keys"\non_refund = "void"\n'
        '[plans.plan_B]\ndelivery = "stock:keys"\n'
        "[pools.keys]\nlow_stock = 2\n",
        KNOWN,
        FILE,
    )
    plan = catalog.plans["plan_A"]
    assert (plan.method, plan.pool, plan.on_refund) == ("stock", "keys", "void")
    assert catalog.plans["plan_B"].on_refund == "keep"
    assert sorted(catalog.stock_pools()) == ["keys"]
    assert [p.plan_id for p in catalog.stock_pools()["keys"]] == ["plan_A", "plan_B"]
    assert catalog.low_stock_threshold("keys") == 2
    assert catalog.low_stock_threshold("other") == 5  # the default


@pytest.mark.parametrize(
    ("entry", "line", "reason"),
    [
        ('delivery = "stock"', 2, "needs a pool name"),
        ('delivery = "stock:"', 2, "needs a pool name"),
        ('delivery = "stock:a b"', 2, "needs a pool name"),
        ('delivery = "none:x"', 2, "takes no ':' argument"),
        ('delivery = "stock:k"\non_refund = "burn"', 2, 'on_refund must be "keep" or "void"'),
        ('delivery = "none"\non_refund = "void"', 2, "applies to stock plans only"),
    ],
)
def test_stock_plan_errors(entry: str, line: int, reason: str) -> None:
    assert_at(catalog_error(f"# c\n[plans.plan_A]\n{entry}\n"), line, reason)


@pytest.mark.parametrize(
    ("pools", "reason"),
    [
        ("[pools.keys]\nlow_stock = -1\n", "low_stock must be a whole number"),
        ("[pools.keys]\nlow_stock = true\n", "low_stock must be a whole number"),
        ("[pools.keys]\nlow_stok = 3\n", "unknown key 'low_stok'"),
        ('[pools."bad pool"]\nlow_stock = 3\n', "a pool name is"),
        ("pools = 3\n", "'pools' must be a table"),
    ],
)
def test_pool_errors(pools: str, reason: str) -> None:
    message = catalog_error(pools)
    assert message.startswith(f"{FILE}:1: "), message
    assert reason in message


@pytest.mark.parametrize("value", ['""', "1", "true"])
def test_delivery_missing_or_not_text(value: str) -> None:
    assert_at(catalog_error(f"# c\n[plans.plan_A]\ndelivery = {value}\n"), 2, "needs delivery")


def test_delivery_missing_entirely() -> None:
    assert_at(catalog_error('# c\n\n[plans.plan_A]\nname = "x"\n'), 3, "needs delivery")


@pytest.mark.parametrize("message", [None, '""', '"   "', '"""\n\n"""'])
def test_message_delivery_without_message(message: str | None) -> None:
    line = "" if message is None else f"message = {message}\n"
    text = f'[plans.plan_Z]\ndelivery = "none"\n\n[plans.plan_A]\ndelivery = "message"\n{line}'
    assert_at(catalog_error(text), 4, 'delivery = "message" needs a message')


def test_unknown_key() -> None:
    text = (
        '[plans.plan_A]\ndelivery = "none"\n\n[plans.plan_B]\ndelivery = "none"\ncolour = "red"\n'
    )
    message = catalog_error(text)
    assert_at(message, 4, "unknown key 'colour'")
    assert "allowed: cancel, delivery, link, message, name, on_refund, subject" in message


@pytest.mark.parametrize("value", ['"no"', "0", '"false"', "[]"])
def test_non_bool_cancel(value: str) -> None:
    text = f'# header\n# more\n[plans.plan_A]\ndelivery = "none"\ncancel = {value}\n'
    assert_at(catalog_error(text), 3, "cancel must be true or false")


@pytest.mark.parametrize(
    "table", ["Bq2Wx9Zt4KmNr", "prod_Gh5Jk8Lm2NpQs", "plan_", '"plan_has space"', '"plan_a-b"']
)
def test_bad_plan_id_table_name(table: str) -> None:
    text = f'[plans.plan_A]\ndelivery = "none"\n\n[plans.{table}]\ndelivery = "none"\n'
    assert_at(catalog_error(text), 4, "must be a Whop plan id")


def test_plan_that_is_not_a_table() -> None:
    assert_at(catalog_error('[plans]\nplan_A = "message"\n'), 2, "must be a table")


def test_plans_that_is_not_a_table() -> None:
    assert_at(catalog_error('# c\nplans = ["plan_A"]\n'), 2, "'plans' must be a table")


def test_unknown_top_level_key() -> None:
    text = '# singular by mistake\n[plan.plan_A]\ndelivery = "none"\n'
    assert_at(catalog_error(text), 2, "unknown top-level key 'plan'")


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("message", '"Hi {{ order_id "', "message is not a valid template"),
        ("message", '"{% if order_id %}no end"', "message is not a valid template"),
        ("subject", '"{% if %}"', "subject is not a valid template"),
        ("subject", '"{{ }}"', "subject is not a valid template"),
    ],
)
def test_invalid_jinja(field: str, value: str, reason: str) -> None:
    other = "subject" if field == "message" else "message"
    text = f'# c\n\n\n[plans.plan_A]\ndelivery = "message"\n{other} = "ok"\n{field} = {value}\n'
    assert_at(catalog_error(text), 4, reason)


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("link", '"ftp://example.com/x"', "link must be an http(s) URL"),
        ("link", "42", "link must be an http(s) URL"),
        ("name", "42", "name must be a string"),
        ("subject", "true", "subject must be a string"),
        ("message", "[1]", "message must be a string"),
    ],
)
def test_bad_field_types(key: str, value: str, reason: str) -> None:
    assert_at(catalog_error(f'[plans.plan_A]\ndelivery = "none"\n{key} = {value}\n'), 1, reason)


def test_invalid_toml_is_one_configuration_error() -> None:
    message = catalog_error('[plans.plan_A]\ndelivery = "none"\nname = \n')
    assert message.startswith(f"{FILE}:3: invalid TOML: ")


def test_invalid_toml_has_file_colon_line() -> None:
    message = catalog_error('[plans.plan_A]\ndelivery = "none"\nname = \n')
    assert message.startswith(f"{FILE}:3: ")


def test_unknown_filter_is_rejected_at_load() -> None:
    text = '[plans.plan_A]\ndelivery = "message"\nmessage = "Hi {{ order_id | nosuchfilter }}"\n'
    with pytest.raises(ConfigurationError, match="not a valid template"):
        parse_catalog(text, KNOWN, FILE)


def test_bad_plan_id_named_like_a_key_points_at_its_table() -> None:
    text = '[plans.plan_A]\ndelivery = "none"\n\n[plans.delivery]\ndelivery = "none"\n'
    assert_at(catalog_error(text), 4, "must be a Whop plan id")


def test_quoted_and_inline_tables_report_their_line() -> None:
    text = '[plans]\nplan_A = { delivery = "none" }\n"plan_B" = { delivery = "nope" }\n'
    assert_at(catalog_error(text), 3, "unknown delivery method 'nope'")


def test_line_numbers_agree_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "catalog.toml"
    good = EXAMPLE.read_text(encoding="utf-8")
    bad = good + '\n[plans.plan_Broken]\ndelivery = "message"\n'
    path.write_text(bad, encoding="utf-8")
    expected_line = bad.splitlines().index("[plans.plan_Broken]") + 1
    with pytest.raises(ConfigurationError) as caught:
        load_catalog(path, KNOWN)
    match = re.match(rf"^{re.escape(str(path))}:(\d+): plan plan_Broken: ", str(caught.value))
    assert match is not None, str(caught.value)
    assert int(match.group(1)) == expected_line


# ----- files ----------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "catalog.toml"
    with pytest.raises(ConfigurationError) as caught:
        load_catalog(path, KNOWN)
    message = str(caught.value)
    assert message.startswith("CATALOG_PATH: ")
    assert str(path) in message
    assert "does not exist" in message


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"^CATALOG_PATH: cannot read"):
        load_catalog(tmp_path, KNOWN)


def test_file_that_is_not_utf8_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "catalog.toml"
    path.write_bytes(b'[plans.plan_A]\ndelivery = "none"\nname = "caf\xe9"\n')
    with pytest.raises(ConfigurationError):
        load_catalog(path, KNOWN)


def test_load_reports_the_path(tmp_path: Path) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text('[plans.plan_A]\ndelivery = "message"\n', encoding="utf-8")
    with pytest.raises(ConfigurationError, match=rf"^{re.escape(str(path))}:1: plan plan_A: "):
        load_catalog(path, KNOWN)


def test_a_plans_templates_are_compiled_once_and_render_each_order_anew() -> None:
    plan = one_plan(delivery='"message"', message='"Order {{ order_id }}"')
    plan.render_message(order_id="ord_1")
    compiled_before = compiled.cache_info()
    assert plan.render_message(order_id="ord_2") == "Order ord_2"
    assert plan.render_message(order_id="ord_3") == "Order ord_3"
    after = compiled.cache_info()
    assert (after.hits - compiled_before.hits, after.misses - compiled_before.misses) == (2, 0)
