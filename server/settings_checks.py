"""The start-up checks of a whole Settings: ranges and choices declared on the fields, then what
spans several settings (TLS pairs, readable files, parameter bytes within the message limit,
unique names, heads bound to configured models). Each failure is a ConfigError naming the keys
and what to write instead."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .config_types import ConfigError, check_ranges
from .model_config import validate_model

if TYPE_CHECKING:
    from .settings import Settings

# room left in a GetParameters answer for names and shapes next to the tensor bytes
PARAMETER_HEADROOM = 1024 * 1024


def check_settings(s: Settings) -> None:
    """Ranges and choices declared on the fields, then the checks that span several."""
    check_ranges("setting {!r}", s)
    # logging refuses an unknown level only when main() configures it, after the settings load
    if s.log_level.upper() not in logging.getLevelNamesMapping():
        raise ConfigError(
            "setting 'log_level' must be DEBUG, INFO, WARNING, ERROR or CRITICAL, "
            f"got {s.log_level!r}"
        )
    for model in s.models:
        validate_model(model)
    if bool(s.tls_cert) != bool(s.tls_key):
        raise ConfigError("tls_cert and tls_key go together: set both or neither")
    if s.tls_client_ca and not s.tls_cert:
        raise ConfigError("tls_client_ca (mTLS) needs tls_cert and tls_key")
    for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_tokens_file"):
        path = getattr(s, name)
        if path and not Path(path).expanduser().is_file():
            raise ConfigError(f"{name}: {path} is not a readable file")
    if s.max_parameter_bytes > s.max_message_bytes - PARAMETER_HEADROOM:
        raise ConfigError(
            f"max_parameter_bytes={s.max_parameter_bytes} must be at most max_message_bytes - "
            f"1 MiB = {s.max_message_bytes - PARAMETER_HEADROOM} (a GetParameters answer is one "
            "message); lower max_parameter_bytes or raise max_message_bytes"
        )
    names = [m.name for m in s.models]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"model names must be unique; repeated: {sorted(dupes)}")
    head_names = [h.name for h in s.heads]
    dupes = {n for n in head_names if head_names.count(n) > 1}
    if dupes:
        raise ConfigError(f"head names must be unique; repeated: {sorted(dupes)}")
    for head in s.heads:
        if not head.name or not head.file:
            raise ConfigError(f"every [[heads]] entry needs a 'name' and a 'file', got {head}")
        if head.model and head.model not in names:
            raise ConfigError(
                f"head {head.name!r} is bound to model {head.model!r}, which is not configured "
                f"(models: {', '.join(names) or 'none'}); fix its 'model' or leave it empty"
            )
