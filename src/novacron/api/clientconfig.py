"""The CLI's contexts file (like kubectl's): named API servers with their tokens, and the current one.

``$NOVACRON_CONFIG`` or ``$XDG_CONFIG_HOME/novacron/contexts.json`` (``~/.config/...``), mode 0600
because it holds tokens. Without a file, the implicit context ``local`` talks to this host's API socket.
``NOVACRON_CONTEXT`` picks another context for one command; ``NOVACRON_SERVER`` and ``NOVACRON_TOKEN``
override the server and token of whichever context is used.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from novacron.api.client import ApiClient
from novacron.api.server import default_socket_path
from novacron.errors import NotFoundError, UserError

CONFIG_VERSION = 1
MAX_CONFIG_BYTES = 1 << 20
MAX_CONTEXTS = 256
CONTEXT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
LOCAL_CONTEXT = "local"


class ClientConfigError(UserError):
    """The contexts file is unreadable, malformed or not private, or a context setting is invalid."""


class ContextNotFound(NotFoundError):
    """No context of that name in the contexts file."""


class Context(BaseModel):
    model_config = ConfigDict(extra="forbid")

    server: str = Field(description="unix:///path/api.sock, https://host:port")
    token: str | None = None
    token_file: str | None = Field(default=None, description="read the token from this file instead")
    ca_file: str | None = Field(default=None, description="cluster CA bundle to verify https servers")

    def resolved_token(self) -> str | None:
        env = os.environ.get("NOVACRON_TOKEN")
        if env:
            return env
        if self.token_file is not None:
            try:
                return Path(self.token_file).expanduser().read_text().strip() or None
            except OSError as exc:
                raise ClientConfigError("cannot read the token file", path=self.token_file,
                                        reason=exc.strerror) from None  # fmt: skip
        return self.token


class ClientConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = CONFIG_VERSION
    current_context: str | None = None
    contexts: dict[str, Context] = Field(default_factory=dict)


def default_config_path() -> Path:
    env = os.environ.get("NOVACRON_CONFIG")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "novacron" / "contexts.json"


def local_context() -> Context:
    return Context(server=f"unix://{default_socket_path()}")


def check_context_name(name: str) -> str:
    if not re.match(CONTEXT_NAME_PATTERN, name):
        raise ClientConfigError("invalid context name: letters, digits, . _ -, up to 64", name=name[:80])
    return name


def load_config(path: Path | None = None) -> ClientConfig:
    path = path or default_config_path()
    try:
        st = path.stat()
    except FileNotFoundError:
        return ClientConfig()
    if st.st_mode & 0o077:
        raise ClientConfigError(
            "contexts file holds tokens and must be private (chmod 600)", path=str(path),
            mode=oct(st.st_mode & 0o777),
        )  # fmt: skip
    if st.st_size > MAX_CONFIG_BYTES:
        raise ClientConfigError("contexts file too large", path=str(path), bytes=st.st_size)
    try:
        config = ClientConfig.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        raise ClientConfigError(f"invalid contexts file: {where}: {err.get('msg')}", path=str(path)) from None
    if config.version != CONFIG_VERSION:
        raise ClientConfigError("unknown contexts file version", path=str(path), version=config.version)
    return config


def save_config(config: ClientConfig, path: Path | None = None) -> Path:
    """Write atomically with mode 0600 (temporary file in the same directory, then rename)."""
    path = path or default_config_path()
    if len(config.contexts) > MAX_CONTEXTS:
        raise ClientConfigError("too many contexts", limit=MAX_CONTEXTS)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = json.dumps(config.model_dump(mode="json", exclude_none=True), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".contexts-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_context(config: ClientConfig) -> tuple[str, Context]:
    """The context a command uses: $NOVACRON_CONTEXT, else the file's current one, else ``local``."""
    name = os.environ.get("NOVACRON_CONTEXT") or config.current_context or LOCAL_CONTEXT
    ctx = config.contexts.get(name)
    if ctx is None:
        if name != LOCAL_CONTEXT:
            raise ContextNotFound(f"no context named {name!r}", context=name,
                                  known=",".join(sorted(config.contexts)) or None)  # fmt: skip
        ctx = local_context()
    server = os.environ.get("NOVACRON_SERVER")
    if server:
        ctx = ctx.model_copy(update={"server": server})
    return name, ctx


def client_for(ctx: Context) -> ApiClient:
    return ApiClient(
        ctx.server,
        token=ctx.resolved_token(),
        ca_file=Path(ctx.ca_file).expanduser() if ctx.ca_file else None,
    )


def connect(path: Path | None = None) -> ApiClient:
    """A client for the current context."""
    return client_for(current_context(load_config(path))[1])
