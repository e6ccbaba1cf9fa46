"""The election settings the framework integrations read: one validated :class:`ElectionConfig`.

Django keeps them in ``settings.GREENLEADER = {"STORE": ..., "KEY": ...}``, Flask in
``app.config["GREENLEADER_STORE"]``...; both come here with the same names. A name the
framework's settings leave out falls back to the environment variable the plain gunicorn
integration reads (``GREENLEADER_STORE``, ``GREENLEADER_KEY``, ``GREENLEADER_TTL``), so that
an operator can keep the store's address out of the code.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgumentError
from ..gunicorn import DEFAULT_TTL, ENV_KEY, ENV_STORE, ENV_TTL
from ..stores import _redacted
from ..stores.base import check_float, check_text

__all__ = ["NAMES", "ElectionConfig"]

#: Default path of the status endpoints, as greenleader.wsgi serves them.
DEFAULT_STATUS_PATH = "/_greenleader"

#: Every setting name, with the environment variable it falls back to (if any).
NAMES: dict[str, str | None] = {
    "STORE": ENV_STORE,
    "KEY": ENV_KEY,
    "TTL": ENV_TTL,
    "NODE": None,
    "RENEW_DEADLINE": None,
    "RENEW_INTERVAL": None,
    "RESIGN_HOLDOFF": None,
    "STATUS_PATH": None,
}
_CANDIDATE_OPTIONS = ("RENEW_DEADLINE", "RENEW_INTERVAL", "RESIGN_HOLDOFF")


@dataclass(frozen=True)
class ElectionConfig:
    """The settings of one app's election.

    :param store: the store URL (``consul://...``, ``file:///...``); never logged or shown.
    :param key: the election key.
    :param ttl: seconds; a crashed leader is replaced after about this long.
    :param node: this process's name in the election. Under gunicorn it replaces the host
        part of ``host:master-pid:worker-pid``; elsewhere the default is ``host:pid``.
    :param candidate_options: ``renew_deadline``, ``renew_interval``, ``resign_holdoff``.
    :param status_path: where the status endpoints are served.
    """

    store: str = field(repr=False)
    key: str
    ttl: float = DEFAULT_TTL
    node: str | None = None
    candidate_options: dict[str, Any] = field(default_factory=dict)
    status_path: str = DEFAULT_STATUS_PATH

    @classmethod
    def from_settings(cls, values: Mapping[str, Any] | None, *, where: str, prefix: str = "",
                      env: Mapping[str, str] | None = None) -> ElectionConfig:
        """Validate ``values`` (upper-case names of :data:`NAMES`); errors name a setting as
        ``where['<prefix><NAME>']``, e.g. ``settings.GREENLEADER['TTL']`` or
        ``app.config['GREENLEADER_TTL']``. Raises InvalidArgumentError."""
        env = os.environ if env is None else env
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise InvalidArgumentError(f"{where} must be a dict, not {type(values).__name__}")
        unknown = sorted(prefix + str(name) for name in values if name not in NAMES)
        if unknown:
            raise InvalidArgumentError(f"{where}: unknown settings {', '.join(unknown)}; "
                                       f"known: {', '.join(prefix + name for name in NAMES)}")

        def label(name: str) -> str:
            return f"{where}['{prefix}{name}']"

        def get(name: str) -> Any:
            value = values.get(name)
            fallback = NAMES[name]
            if value is None and fallback is not None:
                value = env.get(fallback, "").strip() or None
            return value

        store, key = get("STORE"), get("KEY")
        if store is None:
            raise InvalidArgumentError(
                f"{where}: no {prefix}STORE (a URL such as consul://127.0.0.1:8500), nor ${ENV_STORE}")
        if not isinstance(store, str) or "://" not in store:
            shown = _redacted(store) if isinstance(store, str) else type(store).__name__
            raise InvalidArgumentError(f"{label('STORE')}: {shown!r} is not a store URL such as consul://127.0.0.1:8500")
        if key is None:
            raise InvalidArgumentError(f"{where}: no {prefix}KEY (the election key, e.g. 'myapp/jobs'), nor ${ENV_KEY}")
        ttl = get("TTL")
        options = {name.lower(): check_float(label(name), values[name], minimum=0.0, inclusive=False)
                   for name in _CANDIDATE_OPTIONS if values.get(name) is not None}
        node = values.get("NODE")
        path = values.get("STATUS_PATH") or DEFAULT_STATUS_PATH
        if not isinstance(path, str) or not path.startswith("/"):
            raise InvalidArgumentError(f"{label('STATUS_PATH')} must be a path starting with '/', not {path!r}")
        return cls(
            store=store,
            key=check_text(label("KEY"), key),
            ttl=check_float(label("TTL"), DEFAULT_TTL if ttl is None else ttl, minimum=0.0, inclusive=False),
            node=check_text(label("NODE"), node) if node is not None else None,
            candidate_options=options,
            status_path="/" + path.strip("/"),
        )

    def process_node(self) -> str:
        """This process's node name outside gunicorn: ``NODE``, else ``host:pid``."""
        return self.node or f"{socket.gethostname()}:{os.getpid()}"
