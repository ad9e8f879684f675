"""Reading, validating and displaying the stashd configuration.

``load_config`` reads a TOML file; ``settings_from_dict`` does the rest and is
what tests call directly.  Nothing here touches the filesystem beyond reading
the file and checking that ``telegram.rsa_key_file`` exists: directories are
created by the daemon, not by loading its configuration.

Precedence: built-in defaults < the file < the environment
(``STASHD_API_ID``, ``STASHD_API_HASH``; empty variables are ignored).

Paths: ``daemon.state_dir`` is resolved against the config file's directory
(and defaults to it); every other relative path, including a relative
``sqlite:///stashd.db``, is resolved against ``daemon.state_dir``.
"""
from __future__ import annotations

import os
import re
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from config.schema import (
    ENV_OVERRIDES,
    INVALID,
    SCHEMA,
    AccountSettings,
    AdminSettings,
    DaemonSettings,
    DatabaseSettings,
    MetricsSettings,
    Section,
    Settings,
    SupervisorSettings,
    TelegramSettings,
    TableList,
    UploadSettings,
    VerifySettings,
    IngestSettings,
    FieldError,
    section_of,
    unknown_key,
)

#: api_id/api_hash used in simulated mode when none are configured (Telethon
#: refuses empty credentials; the simulated server ignores them).
SIM_API_ID = 1
SIM_API_HASH = "sim"


class ConfigError(Exception):
    """The configuration is unusable.  ``errors`` lists every problem found,
    each as ``"key.path: message"``; ``path`` is the file, when there is one."""

    def __init__(self, errors: list[str], path: Path | None = None):
        self.errors = list(errors)
        self.path = path
        where = f" in {path}" if path else ""
        lines = "\n".join(f"  {e}" for e in self.errors)
        super().__init__(f"{len(self.errors)} configuration error(s){where}:\n{lines}")


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the TOML file at ``path``.  ``env`` defaults to
    ``os.environ``.  Raises :class:`ConfigError` listing every problem."""
    path = Path(path).expanduser()
    data = _read_toml(path)
    try:
        return settings_from_dict(data, base_dir=path.absolute().parent, env=env)
    except ConfigError as exc:
        raise ConfigError(exc.errors, path) from None


_TOML_POSITION = re.compile(r"^(?P<msg>.*?)\s*\(at line (?P<line>\d+), column (?P<col>\d+)\)\s*$", re.S)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {path}"], path) from None
    except IsADirectoryError:
        raise ConfigError([f"is a directory, not a config file: {path}"], path) from None
    except OSError as exc:
        raise ConfigError([f"cannot read config file {path}: {exc.strerror or exc}"], path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"not UTF-8 text (byte {exc.start}): TOML files must be UTF-8"], path) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = _TOML_POSITION.match(str(exc))
        if match:
            message = (f"TOML syntax error at line {match['line']}, column {match['col']}: "
                       f"{match['msg']}")
        else:
            message = f"TOML syntax error: {exc}"
        raise ConfigError([message], path) from None


def settings_from_dict(d: Mapping[str, Any], base_dir: str | Path,
                       env: Mapping[str, str] | None = None) -> Settings:
    """Validate ``d`` (as parsed from TOML) into :class:`Settings`.

    ``base_dir`` stands for the config file's directory.  ``env`` defaults to
    ``os.environ``; pass ``{}`` to ignore the environment."""
    env = os.environ if env is None else env
    errors: list[str] = []
    raw = _parse_sections(d, errors)
    _apply_env(raw, env, errors)
    settings = _build(raw, Path(base_dir).expanduser().absolute(), errors)
    if errors:
        raise ConfigError(errors)
    assert settings is not None
    return settings


def _parse_sections(d: Mapping[str, Any], errors: list[str]) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    if not isinstance(d, Mapping):
        errors.append(f"expected a table at the top level, got {type(d).__name__}")
        return raw
    for key, value in d.items():
        spec = SCHEMA.get(key)
        if spec is None:
            homes = section_of(key)
            elsewhere = f"it belongs in {' or '.join(f'[{h}]' for h in homes)}" if homes else ""
            errors.append(unknown_key(key, key, SCHEMA, elsewhere))
            continue
        raw[key] = spec.parse(value, key, errors)
    return raw


def _apply_env(raw: dict[str, Any], env: Mapping[str, str], errors: list[str]) -> None:
    for var, (section, key) in ENV_OVERRIDES.items():
        value = env.get(var)
        if value is None or not value.strip():
            continue
        spec = SCHEMA[section]
        assert isinstance(spec, Section)
        target = raw.setdefault(section, {})
        try:
            target[key] = spec.fields[key].parse(value.strip())
        except FieldError as exc:
            errors.append(f"{section}.{key}: {exc} (from environment variable {var})")
            target[key] = INVALID


# --------------------------------------------------------------------------
# Defaults, paths and checks across fields
# --------------------------------------------------------------------------


def _resolve(path: Path, base: Path) -> Path:
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def _valid(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not INVALID}


def _build(raw: dict[str, Any], base_dir: Path, errors: list[str]) -> Settings | None:
    daemon = _valid(raw.get("daemon", {}))
    state_dir = _resolve(daemon.pop("state_dir", base_dir), base_dir)
    daemon["sessions_dir"] = _resolve(daemon.get("sessions_dir", Path("sessions")), state_dir)
    if "log_file" in daemon:
        daemon["log_file"] = _resolve(daemon["log_file"], state_dir)

    database = _valid(raw.get("database", {}))
    url = database.get("url", "sqlite:///stashd.db")
    if url.startswith("sqlite:///"):
        target = url[len("sqlite:///"):]
        if target != ":memory:":
            file_part, q, query = target.partition("?")
            url = f"sqlite:///{_resolve(Path(file_part).expanduser(), state_dir)}{q}{query}"
    database["url"] = url

    telegram = _valid(raw.get("telegram", {}))
    telegram["sim_socket"] = _resolve(telegram.get("sim_socket", Path("sim/sim.sock")), state_dir)
    if "rsa_key_file" in telegram:
        rsa = telegram["rsa_key_file"] = _resolve(telegram["rsa_key_file"], state_dir)
        if not rsa.is_file():
            errors.append(f"telegram.rsa_key_file: file not found: {rsa}")
    raw_telegram = raw.get("telegram", {})
    mode = telegram.get("mode", TelegramSettings.mode)
    if raw_telegram.get("mode") is not INVALID:
        for key, var in (("api_id", "STASHD_API_ID"), ("api_hash", "STASHD_API_HASH")):
            if key in telegram or raw_telegram.get(key) is INVALID:
                continue
            if mode == "real":
                errors.append(f"telegram.{key}: required when telegram.mode is 'real' "
                              f"(set it in [telegram] or in the environment as {var})")
            else:
                telegram[key] = SIM_API_ID if key == "api_id" else SIM_API_HASH

    admin = _valid(raw.get("admin", {}))
    admin["socket"] = _resolve(admin.get("socket", Path("stashd.sock")), state_dir)

    metrics = _valid(raw.get("metrics", {}))

    supervisor = _valid(raw.get("supervisor", {}))
    initial = supervisor.get("backoff_initial_seconds", SupervisorSettings.backoff_initial_seconds)
    maximum = supervisor.get("backoff_max_seconds", SupervisorSettings.backoff_max_seconds)
    if initial > maximum:
        errors.append(f"supervisor.backoff_initial_seconds: must not exceed "
                      f"supervisor.backoff_max_seconds ({initial} > {maximum})")

    upload = _valid(raw.get("upload", {}))
    upload["roots"] = tuple(_resolve(root, state_dir) for root in upload.get("roots", ()))
    upload["manifests_dir"] = _resolve(upload.get("manifests_dir", Path("manifests")), state_dir)
    if "inbox_dir" in upload:
        inbox = upload["inbox_dir"] = _resolve(upload["inbox_dir"], state_dir)
        if not any(inbox == root or root in inbox.parents for root in upload["roots"]):
            errors.append(f"upload.inbox_dir: {inbox} is not under any of upload.roots")
    window = upload.get("window", UploadSettings.window)
    slots = upload.get("global_slots", UploadSettings.global_slots)
    if window > slots:
        errors.append(f"upload.window: must not exceed upload.global_slots ({window} > {slots})")

    verify = _valid(raw.get("verify", {}))
    v_initial = verify.get("backoff_initial_seconds", VerifySettings.backoff_initial_seconds)
    v_maximum = verify.get("backoff_max_seconds", VerifySettings.backoff_max_seconds)
    if v_initial > v_maximum:
        errors.append(f"verify.backoff_initial_seconds: must not exceed "
                      f"verify.backoff_max_seconds ({v_initial} > {v_maximum})")

    accounts = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(raw.get("accounts", [])):
        entry = _valid(entry)
        if "session" not in entry:
            continue
        name = entry["session"]
        if name in seen:
            errors.append(f"accounts[{index}].session: duplicate session {name!r} "
                          f"(already in accounts[{seen[name]}])")
            continue
        seen[name] = index
        accounts.append(entry)

    ingest = _ingest(raw.get("ingest", {}), state_dir, daemon["sessions_dir"], accounts,
                     upload.get("destination", UploadSettings.destination), errors)

    if errors:
        return None
    return Settings(
        daemon=DaemonSettings(state_dir=state_dir, **daemon),
        database=DatabaseSettings(**database),
        telegram=TelegramSettings(**telegram),
        admin=AdminSettings(**admin),
        metrics=MetricsSettings(**metrics),
        supervisor=SupervisorSettings(**supervisor),
        accounts=tuple(AccountSettings(**entry) for entry in accounts),
        upload=UploadSettings(**upload),
        verify=VerifySettings(**verify),
        ingest=ingest,
    )


def _ingest(raw: Mapping[str, Any], state_dir: Path, sessions_dir: Path, accounts: list[dict],
            default_destination: str, errors: list[str]) -> IngestSettings:
    """``[ingest]`` with staging_dir resolved and every mapping checked: its account
    must be known (an ``[[accounts]]`` entry or a session file), not disabled; it
    needs a destination (its own or upload.destination); no mapping twice."""
    import dataclasses

    mappings_given = raw.get("mappings", ())
    ingest = _valid(raw)
    ingest["staging_dir"] = _resolve(ingest.get("staging_dir", Path("staging")), state_dir)
    i_initial = ingest.get("set_backoff_initial_seconds", IngestSettings.set_backoff_initial_seconds)
    i_maximum = ingest.get("set_backoff_max_seconds", IngestSettings.set_backoff_max_seconds)
    if i_initial > i_maximum:
        errors.append(f"ingest.set_backoff_initial_seconds: must not exceed "
                      f"ingest.set_backoff_max_seconds ({i_initial} > {i_maximum})")
    listed = {entry["session"]: entry for entry in accounts}
    try:
        on_disk = {p.name[: -len(".session")] for p in sessions_dir.glob("*.session")}
    except OSError:
        on_disk = set()
    known = set(listed) | on_disk
    mappings, seen = [], {}
    for index, m in enumerate(mappings_given if mappings_given is not INVALID else ()):
        if m is INVALID:  # reported already
            continue
        where = f"ingest.mappings[{index}]"
        if m.account not in known:
            hint = f" (did you mean {match!r}?)" if (match := _close(m.account, known)) else ""
            errors.append(f"{where}.account: unknown account {m.account!r}{hint}: not in "
                          f"[[accounts]] and no {m.account}.session in {sessions_dir}")
        elif listed.get(m.account, {}).get("enabled", True) is False:
            errors.append(f"{where}.account: account {m.account!r} is disabled in [[accounts]]")
        destination = m.destination or default_destination
        if not destination:
            errors.append(f"{where}.destination: no destination (set it here or upload.destination)")
        key = (m.account, m.channel, frozenset(m.topics))
        if key in seen:
            errors.append(f"{where}: duplicate of ingest.mappings[{seen[key]}] "
                          f"(account {m.account!r}, channel {m.channel!r})")
            continue
        seen[key] = index
        mappings.append(dataclasses.replace(m, destination=destination))
    ingest["mappings"] = tuple(mappings)
    return IngestSettings(**ingest)


def _close(word: str, candidates: set[str]) -> str | None:
    import difflib
    match = difflib.get_close_matches(word, sorted(candidates), n=1)
    return match[0] if match else None


# --------------------------------------------------------------------------
# Display and the command line
# --------------------------------------------------------------------------


def format_settings(settings: Settings) -> str:
    """The effective configuration as TOML, secrets shown as ``********``."""
    lines: list[str] = []
    for name, spec in SCHEMA.items():
        if isinstance(spec, TableList):
            entries = getattr(settings, name)
            if not entries:
                lines += [f"# no [[{name}]] entries", ""]
            for entry in entries:
                lines += [f"[[{name}]]", *_format_section(spec.section, entry), ""]
        else:
            lines += [f"[{name}]", *_format_section(spec, getattr(settings, name)), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def _format_section(section: Section, values: Any) -> list[str]:
    out = []
    for key, spec in section.fields.items():
        value = getattr(values, key)
        if value is None:
            out.append(f"# {key} is not set")
        else:
            out.append(f"{key} = {spec.show(value)}")
    return out


def load_or_report(path: str | Path, env: Mapping[str, str] | None = None, *,
                   err: TextIO | None = None) -> Settings | None:
    """Load ``path``; on failure print every error to ``err`` (stderr), one per
    line prefixed by the file name, and return None."""
    try:
        return load_config(path, env)
    except ConfigError as exc:
        stream = sys.stderr if err is None else err
        for error in exc.errors:
            print(f"{path}: {error}", file=stream)
        stream.flush()
        return None


def check_main(path: str | Path, env: Mapping[str, str] | None = None, *,
               show: bool = False, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Validate ``path`` for the command line: 0 when fine, 2 (after printing
    every error to stderr) when not.  ``show`` prints the effective
    configuration (secrets masked) to ``out`` on success."""
    settings = load_or_report(path, env, err=err)
    if settings is None:
        return 2
    if show:
        print(format_settings(settings), end="", file=sys.stdout if out is None else out)
    return 0
