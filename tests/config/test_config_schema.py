"""Field types and sections, without the loader."""
from __future__ import annotations

from pathlib import Path

import pytest

from config.schema import (
    INVALID,
    SCHEMA,
    Boolean,
    Choice,
    DatabaseUrl,
    FieldError,
    Float,
    Integer,
    PathValue,
    Section,
    SessionName,
    String,
    TableList,
    mask_dsn,
)


@pytest.mark.parametrize("value, expected", [(5, 5), ("42", 42), (" 7 ", 7)])
def test_integer_accepts_ints_and_digit_strings(value, expected):
    assert Integer().parse(value) == expected


@pytest.mark.parametrize("value, message", [
    ("abc", "expected an integer, got 'abc'"),
    (True, "expected an integer, got true"),
    (1.5, "expected an integer, got 1.5"),
    ([1], "expected an integer, got an array"),
    ({"a": 1}, "expected an integer, got a table"),
])
def test_integer_rejects_other_types(value, message):
    with pytest.raises(FieldError) as exc:
        Integer().parse(value)
    assert str(exc.value) == message


def test_integer_range_messages():
    port = Integer(minimum=1, maximum=65535)
    for bad in (0, 65536):
        with pytest.raises(FieldError, match=rf"must be between 1 and 65535, got {bad}"):
            port.parse(bad)
    assert port.parse(1) == 1 and port.parse(65535) == 65535
    with pytest.raises(FieldError, match="must be >= 0, got -1"):
        Integer(minimum=0).parse(-1)
    with pytest.raises(FieldError, match="must be <= 3, got 4"):
        Integer(maximum=3).parse(4)


def test_float_accepts_ints_and_checks_exclusive_minimum():
    positive = Float(minimum=0, exclusive_minimum=True)
    assert positive.parse(2) == 2.0 and isinstance(positive.parse(2), float)
    with pytest.raises(FieldError, match="must be > 0, got 0.0"):
        positive.parse(0)
    assert Float(minimum=0).parse(0) == 0.0
    for bad in (True, "fast", float("nan"), float("inf")):
        with pytest.raises(FieldError):
            Float().parse(bad)


def test_boolean_is_strict():
    assert Boolean().parse(False) is False
    for bad in ("true", 1, "yes"):
        with pytest.raises(FieldError, match="expected true or false"):
            Boolean().parse(bad)


def test_string_rejects_empty_and_non_strings():
    with pytest.raises(FieldError, match="must not be empty"):
        String().parse("  ")
    with pytest.raises(FieldError, match="expected a string, got 5"):
        String().parse(5)


def test_secret_string_never_echoes_the_bad_value():
    with pytest.raises(FieldError) as exc:
        String(secret=True).parse(123456789)
    assert "123456789" not in str(exc.value)
    assert "an integer" in str(exc.value)


def test_choice_lists_choices_and_suggests():
    mode = Choice(("real", "simulated"))
    assert mode.parse("simulated") == "simulated"
    with pytest.raises(FieldError) as exc:
        mode.parse("simulted")
    assert str(exc.value) == ("must be one of 'real', 'simulated', got 'simulted' "
                              "(did you mean 'simulated'?)")
    with pytest.raises(FieldError):
        mode.parse("REAL")  # case matters unless asked otherwise


def test_case_insensitive_choice_normalises():
    assert Choice(("DEBUG", "INFO"), case_insensitive=True).parse("debug") == "DEBUG"


def test_path_expands_user(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    assert PathValue().parse("~/x") == Path("/home/someone/x")
    assert PathValue().parse("rel/x") == Path("rel/x")
    with pytest.raises(FieldError):
        PathValue().parse("")


@pytest.mark.parametrize("url, expected", [
    ("sqlite:///stashd.db", "sqlite:///stashd.db"),
    ("sqlite:////abs/stashd.db", "sqlite:////abs/stashd.db"),
    ("postgresql://u@h:5432/db", "postgresql://u@h:5432/db"),
    ("postgres://u:pw@h/db", "postgresql://u:pw@h/db"),
    ("postgresql:///db", "postgresql:///db"),  # local Unix socket
])
def test_database_url_accepts_and_normalises(url, expected):
    assert DatabaseUrl().parse(url) == expected


@pytest.mark.parametrize("url, fragment", [
    ("mysql://u:hunter2@h/db", "must start with 'sqlite:///' or 'postgresql://'"),
    ("sqlite://stashd.db", "three slashes"),
    ("sqlite:///", "needs a file"),
    ("postgresql://u:hunter2@h:5432", "names no database"),
    ("postgresql://u:hunter2@h:99999/db", "port"),
])
def test_database_url_errors_mask_the_password(url, fragment):
    with pytest.raises(FieldError) as exc:
        DatabaseUrl().parse(url)
    assert fragment in str(exc.value)
    assert "hunter2" not in str(exc.value)


@pytest.mark.parametrize("url, masked", [
    ("postgresql://u:hunter2@h:5432/db", "postgresql://u:********@h:5432/db"),
    ("postgresql://u:p@ss@h/db", "postgresql://u:********@h/db"),
    ("postgresql://u@h/db?password=hunter2&sslmode=require",
     "postgresql://u@h/db?password=********&sslmode=require"),
    ("postgresql://u@h/db", "postgresql://u@h/db"),
    ("sqlite:////x/y.db", "sqlite:////x/y.db"),
])
def test_mask_dsn(url, masked):
    assert mask_dsn(url) == masked


def test_session_name_strips_suffix_and_refuses_paths():
    assert SessionName().parse("alice.session") == "alice"
    for bad in ("../alice", "a/b", ".hidden", ".session"):
        with pytest.raises(FieldError, match="not a session name"):
            SessionName().parse(bad)


def test_section_collects_every_error_and_marks_invalid():
    section = SCHEMA["metrics"]
    errors: list[str] = []
    values = section.parse({"port": "x", "enabeld": True, "host": ""}, "metrics", errors)
    assert errors == [
        "metrics.port: expected an integer, got 'x'",
        "metrics.enabeld: unknown key (did you mean 'enabled'?)",
        "metrics.host: must not be empty",
    ]
    assert values == {"port": INVALID, "host": INVALID}


def test_section_rejects_non_table():
    errors: list[str] = []
    assert SCHEMA["daemon"].parse("x", "daemon", errors) == {}
    assert errors == ["daemon: expected a table ([daemon]), got 'x'"]


def test_table_list_paths_and_required():
    errors: list[str] = []
    spec = SCHEMA["accounts"]
    assert isinstance(spec, TableList)
    spec.parse([{"session": "a"}, "b", {"paused": 1}], "accounts", errors)
    assert errors == [
        "accounts[1]: expected a table, got 'b'",
        "accounts[2].paused: expected true or false, got 1",
        "accounts[2].session: required",
    ]
    errors.clear()
    spec.parse({"session": "a"}, "accounts", errors)
    assert errors == ["accounts: expected an array of tables ([[accounts]]), got a table"]


def test_schema_keys_are_dataclass_fields():
    class Thing:  # not a dataclass: refused when the schema is declared
        pass

    with pytest.raises(TypeError):
        Section(Thing, {"x": String()})
    from config.schema import DaemonSettings

    with pytest.raises(AssertionError):
        Section(DaemonSettings, {"nope": String()})
