"""stashd configuration: a TOML file validated against a declarative schema.

Everything else reads settings through these names::

    settings = config.load_config("stashd.toml")        # raises ConfigError(.errors)
    print(config.format_settings(settings))              # secrets masked
    sys.exit(config.check_main("stashd.toml"))           # 0 or 2, errors on stderr
"""
from config.loader import (
    ConfigError,
    check_main,
    format_settings,
    load_config,
    load_or_report,
    settings_from_dict,
)
from config.schema import (
    MASK,
    AccountSettings,
    AdminSettings,
    DaemonSettings,
    DatabaseSettings,
    MetricsSettings,
    Settings,
    SupervisorSettings,
    TelegramSettings,
    UploadSettings,
    mask_dsn,
)

__all__ = [
    "MASK",
    "AccountSettings",
    "AdminSettings",
    "ConfigError",
    "DaemonSettings",
    "DatabaseSettings",
    "MetricsSettings",
    "Settings",
    "SupervisorSettings",
    "TelegramSettings",
    "UploadSettings",
    "check_main",
    "format_settings",
    "load_config",
    "load_or_report",
    "mask_dsn",
    "settings_from_dict",
]
