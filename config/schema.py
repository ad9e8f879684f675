"""The settings dataclasses and the declarative schema that fills them.

A schema is a mapping of top-level TOML names to :class:`Section` (a table such
as ``[telegram]``) or :class:`TableList` (an array of tables such as
``[[accounts]]``).  A section is built from one frozen settings dataclass and
one field type per key; the dataclass holds the static defaults, the field type
turns a TOML value into a Python value or raises :class:`FieldError` with a
message meant for a person.  Sections never stop at the first problem: every
error is appended to a list as ``"key.path: message"``.

Defaults that depend on other values (``state_dir``-relative paths, the SQLite
URL) and checks across fields live in :mod:`config.loader`.
"""
from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

MASK = "********"

#: Marks a key whose value was given but failed to parse (so the loader skips
#: checks that depend on it instead of reporting follow-up errors).
INVALID: Any = type("Invalid", (), {"__repr__": lambda self: "<invalid>"})()

LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")
TELEGRAM_MODES = ("real", "simulated")


# --------------------------------------------------------------------------
# Settings (frozen: they cross every module boundary)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonSettings:
    state_dir: Path
    sessions_dir: Path
    log_level: str = "INFO"
    log_file: Path | None = None
    log_json: bool = False


@dataclass(frozen=True)
class DatabaseSettings:
    url: str  # "sqlite:////abs/path.db" or "postgresql://user[:pw]@host:port/db"

    def __repr__(self) -> str:
        return f"DatabaseSettings(url={mask_dsn(self.url)!r})"


@dataclass(frozen=True)
class TelegramSettings:
    mode: str = "real"
    api_id: int = 0  # secret-ish: masked on display
    api_hash: str = ""  # secret: never shown
    dc_id: int = 2
    host: str = "149.154.167.50"
    port: int = 443
    rsa_key_file: Path | None = None
    test_servers: bool = False
    sim_socket: Path | None = None  # always set by the loader (state_dir/sim/sim.sock)
    request_timeout_seconds: float = 60.0
    upload_limit_margin_bytes: int = 64 * 1024 * 1024

    def __repr__(self) -> str:
        return _masked_repr(self, ("api_id", "api_hash"))


@dataclass(frozen=True)
class AdminSettings:
    socket: Path
    max_frame_bytes: int = 1_048_576


@dataclass(frozen=True)
class MetricsSettings:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True)
class SupervisorSettings:
    max_restarts: int = 5
    restart_window_seconds: float = 60.0
    backoff_initial_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    watchdog: bool = True
    stop_timeout_seconds: float = 20.0


@dataclass(frozen=True)
class UploadSettings:
    roots: tuple[Path, ...] = ()  # only files under these may be uploaded (symlinks resolved)
    inbox_dir: Path | None = None  # watched folder; must lie under a root
    manifests_dir: Path | None = None  # always set by the loader (state_dir/manifests)
    destination: str = ""  # default destination channel (username or -100 id)
    uploaders: int = 4  # UploaderActor pool size
    window: int = 8  # upload parts in flight per account
    budget_bytes: int = 64 * 1024 * 1024  # in-flight part bytes across all uploads
    global_slots: int = 32  # upload parts in flight across all accounts
    delete_original: bool = False  # default policy: delete a file once verified
    handover_after_seconds: float = 600.0  # a started transfer moves to another account after its own is down this long


@dataclass(frozen=True)
class IngestMapping:
    """One ``[[ingest.mappings]]`` entry: what ``account`` reads and where it goes."""

    account: str  # session name
    channel: str  # source channel: username or -100... id
    topics: tuple[int | str, ...] = ()  # forum topic ids or titles; () = the whole channel
    destination: str = ""  # set by the loader to upload.destination when not given
    creator: str | None = None  # recorded on every package ingested through this mapping
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class IngestSettings:
    enabled: bool = True
    staging_dir: Path | None = None  # always set by the loader (state_dir/staging)
    scan_interval_seconds: float = 900.0
    scan_jitter_seconds: float = 60.0
    download_window: int = 8  # parallel 1 MiB download requests per account
    max_archive_bytes: int = 8 * 1024 ** 3  # a larger archive set is skipped (too_large)
    set_lease_seconds: float = 600.0  # a set being downloaded is ours this long, renewed while we work
    max_set_attempts: int = 5  # failures of one set before it is skipped (reason failed)
    set_backoff_initial_seconds: float = 60.0  # wait after a set's first failure, doubling
    set_backoff_max_seconds: float = 3600.0
    mappings: tuple[IngestMapping, ...] = ()


@dataclass(frozen=True)
class VerifySettings:
    """``[verify]``: the VerifierActor's schedule, leases, backoff and cleanup (issue 4)."""

    enabled: bool = True  # run the verifier whenever the upload pipeline runs
    first_check_delay_seconds: float = 60.0  # uploaded -> first check
    interval_seconds: float = 300.0  # re-check while uploaded/verifying
    verified_interval_seconds: float = 7 * 86400.0  # slow cycle for verified/cleaned
    lease_seconds: float = 300.0  # how long a claimed check is ours
    batch_size: int = 100  # message ids per GetMessages call (Telegram's cap)
    max_attempts: int = 5  # re-uploads before a transfer is failed
    backoff_initial_seconds: float = 30.0  # wait before a 2nd re-upload / after a check error
    backoff_max_seconds: float = 3600.0
    cleanup_grace_seconds: float = 86400.0  # newest message this old (and verified) before cleanup
    deep_check: bool = False  # also download sampled 1 MiB blocks and compare their hashes
    deep_check_samples: int = 2  # blocks sampled per document


@dataclass(frozen=True)
class AccountSettings:
    session: str
    enabled: bool = True
    paused: bool = False
    hourly_files: int = 0  # quotas; 0 = no limit
    hourly_bytes: int = 0
    daily_files: int = 0
    daily_bytes: int = 0


@dataclass(frozen=True)
class Settings:
    daemon: DaemonSettings
    database: DatabaseSettings
    telegram: TelegramSettings
    admin: AdminSettings
    metrics: MetricsSettings
    supervisor: SupervisorSettings
    accounts: tuple[AccountSettings, ...] = ()
    upload: UploadSettings = UploadSettings()
    verify: VerifySettings = VerifySettings()
    ingest: IngestSettings = IngestSettings()

    def account(self, session: str) -> AccountSettings:
        """The ``[[accounts]]`` entry for ``session``, or the defaults when unlisted."""
        for entry in self.accounts:
            if entry.session == session:
                return entry
        return AccountSettings(session=session)


def _masked_repr(obj: Any, secret: Iterable[str]) -> str:
    secret = set(secret)
    parts = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        shown = repr(MASK) if f.name in secret and value not in (0, "", None) else repr(value)
        parts.append(f"{f.name}={shown}")
    return f"{type(obj).__name__}({', '.join(parts)})"


def mask_dsn(url: str) -> str:
    """``url`` with any password (in the userinfo or a ``password=`` query
    parameter) replaced by ``********``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:{MASK}@{hostport}"
    tail = re.sub(r"(?i)(\bpassword=)[^&#]*", lambda m: m.group(1) + MASK, tail)
    return f"{scheme}://{netloc}{slash}{tail}"


# --------------------------------------------------------------------------
# Field types
# --------------------------------------------------------------------------


class FieldError(ValueError):
    """One value failed validation; the message names the problem, not the key."""


def kind_of(value: Any) -> str:
    """'a string', 'an integer', ... for messages that must not echo the value."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "an array"
    return "a date/time" if hasattr(value, "isoformat") else type(value).__name__


def quote(value: Any) -> str:
    """A short, readable rendering of a bad value for an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (Mapping, list, tuple)):
        return kind_of(value)
    text = str(value) if isinstance(value, (int, float)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


class Field:
    """Base field type. ``secret`` masks the value on display; ``echo`` says
    whether a *bad* value may be quoted in an error (never for real secrets)."""

    expected = "a value"

    def __init__(self, *, secret: bool = False, echo: bool | None = None, required: bool = False):
        self.secret = secret
        self.echo = (not secret) if echo is None else echo
        self.required = required

    def parse(self, value: Any) -> Any:
        raise NotImplementedError

    def type_error(self, value: Any) -> FieldError:
        got = quote(value) if self.echo else kind_of(value)
        return FieldError(f"expected {self.expected}, got {got}")

    def show(self, value: Any) -> str:
        """``value`` as a TOML literal (masked if secret)."""
        if self.secret:
            return toml_string(MASK)
        return self.literal(value)

    def literal(self, value: Any) -> str:
        return toml_string(str(value))


class String(Field):
    expected = "a string"

    def __init__(self, *, allow_empty: bool = False, **kw: Any):
        super().__init__(**kw)
        self.allow_empty = allow_empty

    def parse(self, value: Any) -> str:
        if not isinstance(value, str):
            raise self.type_error(value)
        if not self.allow_empty and not value.strip():
            raise FieldError("must not be empty")
        return value


def _range_error(value: float, minimum: float | None, maximum: float | None,
                 exclusive_minimum: bool) -> FieldError | None:
    low_ok = minimum is None or (value > minimum if exclusive_minimum else value >= minimum)
    high_ok = maximum is None or value <= maximum
    if low_ok and high_ok:
        return None
    if minimum is not None and maximum is not None and not exclusive_minimum:
        return FieldError(f"must be between {minimum} and {maximum}, got {value}")
    if not low_ok:
        return FieldError(f"must be {'>' if exclusive_minimum else '>='} {minimum}, got {value}")
    return FieldError(f"must be <= {maximum}, got {value}")


class Integer(Field):
    """An integer (a string of digits is accepted too, as from the environment)."""

    expected = "an integer"

    def __init__(self, *, minimum: int | None = None, maximum: int | None = None, **kw: Any):
        super().__init__(**kw)
        self.minimum, self.maximum = minimum, maximum

    def parse(self, value: Any) -> int:
        if isinstance(value, bool):
            raise self.type_error(value)
        if isinstance(value, str):
            try:
                number = int(value.strip(), 10)
            except ValueError:
                raise self.type_error(value) from None
        elif isinstance(value, int):
            number = value
        else:
            raise self.type_error(value)
        error = _range_error(number, self.minimum, self.maximum, False)
        if error:
            raise error if self.echo else FieldError("out of range")
        return number

    def literal(self, value: Any) -> str:
        return str(value)


class Float(Field):
    """A finite number; integers are accepted."""

    expected = "a number"

    def __init__(self, *, minimum: float | None = None, maximum: float | None = None,
                 exclusive_minimum: bool = False, **kw: Any):
        super().__init__(**kw)
        self.minimum, self.maximum, self.exclusive_minimum = minimum, maximum, exclusive_minimum

    def parse(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise self.type_error(value)
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except ValueError:
            raise self.type_error(value) from None
        if not math.isfinite(number):
            raise FieldError(f"must be a finite number, got {quote(value)}")
        error = _range_error(number, self.minimum, self.maximum, self.exclusive_minimum)
        if error:
            raise error
        return number

    def literal(self, value: Any) -> str:
        return repr(float(value))


class Boolean(Field):
    expected = "true or false"

    def parse(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.type_error(value)
        return value

    def literal(self, value: Any) -> str:
        return "true" if value else "false"


class PathValue(Field):
    """A filesystem path; ``~`` is expanded.  Relative paths are resolved by the
    loader (against ``daemon.state_dir`` or the config file's directory)."""

    expected = "a path (string)"

    def parse(self, value: Any) -> Path:
        if not isinstance(value, str):
            raise self.type_error(value)
        if not value.strip():
            raise FieldError("must not be empty")
        if "\0" in value:
            raise FieldError("must not contain a NUL character")
        try:
            return Path(value).expanduser()
        except RuntimeError as exc:  # no home directory to expand ~ into
            raise FieldError(str(exc)) from None


class PathList(Field):
    """An array of paths (each as :class:`PathValue`)."""

    expected = "an array of paths"

    def parse(self, value: Any) -> tuple[Path, ...]:
        if not isinstance(value, list):
            raise self.type_error(value)
        item = PathValue()
        paths = []
        for index, entry in enumerate(value):
            try:
                paths.append(item.parse(entry))
            except FieldError as exc:
                raise FieldError(f"[{index}]: {exc}") from None
        return tuple(paths)

    def literal(self, value: Any) -> str:
        return "[" + ", ".join(toml_string(str(p)) for p in value) + "]"


class Choice(Field):
    expected = "a string"

    def __init__(self, choices: Iterable[str], *, case_insensitive: bool = False, **kw: Any):
        super().__init__(**kw)
        self.choices = tuple(choices)
        self.case_insensitive = case_insensitive

    def parse(self, value: Any) -> str:
        if not isinstance(value, str):
            raise self.type_error(value)
        if self.case_insensitive:
            for choice in self.choices:
                if choice.lower() == value.strip().lower():
                    return choice
        elif value in self.choices:
            return value
        allowed = ", ".join(repr(c) for c in self.choices)
        hint = did_you_mean(value, self.choices)
        raise FieldError(f"must be one of {allowed}, got {quote(value)}{hint}")


class DatabaseUrl(Field):
    """``sqlite:///path`` or ``postgresql://user[:password]@host[:port]/dbname``
    (``postgres://`` is accepted and normalised).  The password is masked on
    display and in errors."""

    expected = "a database URL (string)"

    def parse(self, value: Any) -> str:
        if not isinstance(value, str):
            raise self.type_error(value)
        url = value.strip()
        if url.startswith("postgres://"):
            url = "postgresql://" + url[len("postgres://"):]
        if url.startswith("sqlite:///"):
            if not url[len("sqlite:///"):].strip():
                raise FieldError("sqlite URL needs a file: sqlite:///path/to/stashd.db")
            return url
        if url.startswith("postgresql://"):
            rest = url[len("postgresql://"):]
            netloc, _, path = rest.partition("/")
            hostport = netloc.rpartition("@")[2]
            port = hostport.rpartition("]")[2].partition(":")[2] if hostport else ""
            if port and not (port.isdigit() and 1 <= int(port) <= 65535):
                raise FieldError(f"port in {mask_dsn(url)!r} must be between 1 and 65535")
            if not path.partition("?")[0].strip():
                raise FieldError(
                    f"{mask_dsn(url)!r} names no database: use postgresql://user@host:5432/dbname")
            return url
        hint = ""
        if url.startswith("sqlite:"):
            hint = " (a SQLite URL has three slashes: sqlite:///path/to/stashd.db)"
        raise FieldError(
            f"must start with 'sqlite:///' or 'postgresql://', got {mask_dsn(url)!r}{hint}")

    def literal(self, value: Any) -> str:
        return toml_string(mask_dsn(str(value)))


class SessionName(String):
    """An account name: the stem of ``NAME.session`` in ``daemon.sessions_dir``."""

    def parse(self, value: Any) -> str:
        name = super().parse(value).strip()
        if name.endswith(".session"):
            name = name[: -len(".session")]
        if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
            raise FieldError(f"not a session name: {quote(value)} (use the file name without .session)")
        return name


class ChannelRef(Field):
    """A channel: a username (``@`` optional) or a marked ``-100...`` id (an
    integer or a string of digits); kept as a string."""

    expected = "a channel username or -100... id"

    def parse(self, value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise self.type_error(value)
        text = str(value).strip().lstrip("@")
        if not text:
            raise FieldError("must not be empty")
        if text.lstrip("-").isdigit():
            if not text.startswith("-100") or len(text) <= 4:
                raise FieldError(f"a channel id is marked -100..., got {quote(value)}")
            return text
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{3,31}", text):
            raise FieldError(f"not a channel username or -100... id: {quote(value)}")
        return text


class TopicList(Field):
    """Forum topics: an array of topic ids (integers) or titles (strings)."""

    expected = "an array of topic ids or titles"

    def parse(self, value: Any) -> tuple[int | str, ...]:
        if not isinstance(value, list):
            raise self.type_error(value)
        out: list[int | str] = []
        for index, entry in enumerate(value):
            if isinstance(entry, bool) or not isinstance(entry, (int, str)):
                raise FieldError(f"[{index}]: expected a topic id or title, got {quote(entry)}")
            if isinstance(entry, int) and entry < 1:
                raise FieldError(f"[{index}]: a topic id is >= 1, got {entry}")
            if isinstance(entry, str) and not entry.strip():
                raise FieldError(f"[{index}]: a topic title must not be empty")
            if entry in out:
                raise FieldError(f"[{index}]: topic {quote(entry)} is listed twice")
            out.append(entry)
        return tuple(out)

    def literal(self, value: Any) -> str:
        return "[" + ", ".join(str(t) if isinstance(t, int) else toml_string(t) for t in value) + "]"


class StringList(Field):
    expected = "an array of strings"

    def parse(self, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise self.type_error(value)
        return tuple(value)

    def literal(self, value: Any) -> str:
        return "[" + ", ".join(toml_string(v) for v in value) + "]"


class NestedTablesError(FieldError):
    """Several problems inside an array of tables; ``errors`` are ``"[i].key: msg"``.

    ``partial`` is every entry, ``INVALID`` where it failed, so checks across
    entries (duplicates, unknown names) still run on the good ones."""

    def __init__(self, errors: list[str], partial: tuple = ()):
        self.errors = list(errors)
        self.partial = partial
        super().__init__("; ".join(self.errors))


class TableArray(Field):
    """An array of tables inside a section (``[[ingest.mappings]]``), each
    checked against ``section`` and turned into its dataclass; every problem
    is reported (see :class:`NestedTablesError`)."""

    expected = "an array of tables"

    def __init__(self, section: "Section", **kw: Any):
        super().__init__(**kw)
        self.section = section

    def parse(self, value: Any) -> tuple:
        if not isinstance(value, list):
            raise self.type_error(value)
        errors: list[str] = []
        entries = []
        for index, item in enumerate(value):
            values = self.section.parse(item, f"[{index}]", errors)
            ok = isinstance(item, Mapping) and all(v is not INVALID for v in values.values())
            entries.append(self.section.cls(**values) if ok else INVALID)
        if errors:
            raise NestedTablesError(errors, tuple(entries))
        return tuple(entries)

    def literal(self, value: Any) -> str:
        rows = []
        for entry in value:
            items = [f"{key} = {spec.show(getattr(entry, key))}"
                     for key, spec in self.section.fields.items() if getattr(entry, key) is not None]
            rows.append("{" + ", ".join(items) + "}")
        return "[" + ", ".join(rows) + "]"


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


# --------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class Section:
    """One TOML table, filling the dataclass ``cls``; ``fields`` maps every key
    (in display order) to its field type.  Static defaults come from ``cls``."""

    def __init__(self, cls: type, fields_: Mapping[str, Field], doc: str = ""):
        names = {f.name for f in fields(cls)}
        unknown = set(fields_) - names
        assert not unknown, f"{cls.__name__} has no fields {sorted(unknown)}"
        self.cls = cls
        self.fields = dict(fields_)
        self.doc = doc

    def parse(self, data: Any, path: str, errors: list[str]) -> dict[str, Any]:
        """The keys present in ``data``, parsed (``INVALID`` where they failed)."""
        if not isinstance(data, Mapping):
            hint = "" if "[" in path else f" ([{path}])"
            errors.append(f"{path}: expected a table{hint}, got {quote(data)}")
            return {}
        values: dict[str, Any] = {}
        for key, value in data.items():
            spec = self.fields.get(key)
            if spec is None:
                errors.append(unknown_key(_join(path, key), key, self.fields))
                continue
            try:
                values[key] = spec.parse(value)
            except FieldError as exc:
                nested = getattr(exc, "errors", None)  # a list of tables: one error per problem
                if nested:
                    errors.extend(f"{_join(path, key)}{e}" for e in nested)
                else:
                    errors.append(f"{_join(path, key)}: {exc}")
                values[key] = getattr(exc, "partial", INVALID)
        for key, spec in self.fields.items():
            if spec.required and key not in values:
                errors.append(f"{_join(path, key)}: required")
                values[key] = INVALID
        return values


class TableList:
    """An array of tables (``[[accounts]]``), each checked against ``section``."""

    def __init__(self, section: Section, doc: str = ""):
        self.section = section
        self.doc = doc

    def parse(self, data: Any, path: str, errors: list[str]) -> list[dict[str, Any]]:
        if not isinstance(data, list):
            errors.append(f"{path}: expected an array of tables ([[{path}]]), got {quote(data)}")
            return []
        return [self.section.parse(item, f"{path}[{i}]", errors) for i, item in enumerate(data)]


def unknown_key(keypath: str, key: str, known: Iterable[str], elsewhere: str = "") -> str:
    hint = did_you_mean(key, known)
    if not hint and elsewhere:
        hint = f" ({elsewhere})"
    return f"{keypath}: unknown key{hint}"


# --------------------------------------------------------------------------
# The stashd schema
# --------------------------------------------------------------------------

SCHEMA: dict[str, Section | TableList] = {
    "daemon": Section(DaemonSettings, {
        "state_dir": PathValue(),
        "sessions_dir": PathValue(),
        "log_level": Choice(LOG_LEVELS, case_insensitive=True),
        "log_file": PathValue(),
        "log_json": Boolean(),
    }),
    "database": Section(DatabaseSettings, {
        "url": DatabaseUrl(),
    }),
    "telegram": Section(TelegramSettings, {
        "mode": Choice(TELEGRAM_MODES),
        "api_id": Integer(minimum=1, secret=True, echo=True),
        "api_hash": String(secret=True),
        "dc_id": Integer(minimum=1, maximum=5),
        "host": String(),
        "port": Integer(minimum=1, maximum=65535),
        "rsa_key_file": PathValue(),
        "test_servers": Boolean(),
        "sim_socket": PathValue(),
        "request_timeout_seconds": Float(minimum=0, exclusive_minimum=True),
        "upload_limit_margin_bytes": Integer(minimum=0),
    }),
    "admin": Section(AdminSettings, {
        "socket": PathValue(),
        "max_frame_bytes": Integer(minimum=1),
    }),
    "metrics": Section(MetricsSettings, {
        "enabled": Boolean(),
        "host": String(),
        "port": Integer(minimum=0, maximum=65535),  # 0: pick a free port
    }),
    "supervisor": Section(SupervisorSettings, {
        "max_restarts": Integer(minimum=0),
        "restart_window_seconds": Float(minimum=0, exclusive_minimum=True),
        "backoff_initial_seconds": Float(minimum=0),
        "backoff_max_seconds": Float(minimum=0),
        "watchdog": Boolean(),
        "stop_timeout_seconds": Float(minimum=0, exclusive_minimum=True),
    }),
    "upload": Section(UploadSettings, {
        "roots": PathList(),
        "inbox_dir": PathValue(),
        "manifests_dir": PathValue(),
        "destination": String(allow_empty=True),
        "uploaders": Integer(minimum=1, maximum=64),
        "window": Integer(minimum=1, maximum=64),
        "budget_bytes": Integer(minimum=512 * 1024),
        "global_slots": Integer(minimum=1),
        "delete_original": Boolean(),
        "handover_after_seconds": Float(minimum=0),
    }),
    "ingest": Section(IngestSettings, {
        "enabled": Boolean(),
        "staging_dir": PathValue(),
        "scan_interval_seconds": Float(minimum=0, exclusive_minimum=True),
        "scan_jitter_seconds": Float(minimum=0),
        "download_window": Integer(minimum=1, maximum=64),
        "max_archive_bytes": Integer(minimum=1),
        "set_lease_seconds": Float(minimum=3, maximum=86400),
        "max_set_attempts": Integer(minimum=1),
        "set_backoff_initial_seconds": Float(minimum=0),
        "set_backoff_max_seconds": Float(minimum=0),
        "mappings": TableArray(Section(IngestMapping, {
            "account": SessionName(required=True),
            "channel": ChannelRef(required=True),
            "topics": TopicList(),
            "destination": ChannelRef(),
            "creator": String(),
            "tags": StringList(),
        })),
    }),
    "verify": Section(VerifySettings, {
        "enabled": Boolean(),
        "first_check_delay_seconds": Float(minimum=0),
        "interval_seconds": Float(minimum=0, exclusive_minimum=True),
        "verified_interval_seconds": Float(minimum=0, exclusive_minimum=True),
        "lease_seconds": Float(minimum=0, exclusive_minimum=True),
        "batch_size": Integer(minimum=1, maximum=100),
        "max_attempts": Integer(minimum=1),
        "backoff_initial_seconds": Float(minimum=0),
        "backoff_max_seconds": Float(minimum=0),
        "cleanup_grace_seconds": Float(minimum=0),
        "deep_check": Boolean(),
        "deep_check_samples": Integer(minimum=1, maximum=64),
    }),
    "accounts": TableList(Section(AccountSettings, {
        "session": SessionName(required=True),
        "enabled": Boolean(),
        "paused": Boolean(),
        "hourly_files": Integer(minimum=0),
        "hourly_bytes": Integer(minimum=0),
        "daily_files": Integer(minimum=0),
        "daily_bytes": Integer(minimum=0),
    })),
}

#: Environment variables that override keys of the file (the environment wins).
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "STASHD_API_ID": ("telegram", "api_id"),
    "STASHD_API_HASH": ("telegram", "api_hash"),
}


def section_of(key: str) -> list[str]:
    """Sections that have a key called ``key`` (for 'it belongs in [x]' hints)."""
    return [name for name, spec in SCHEMA.items()
            if isinstance(spec, Section) and key in spec.fields]
