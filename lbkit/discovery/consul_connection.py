"""Where and how to reach a Consul agent: its address, ACL token and TLS, from explicit options and the
environment variables Consul's own tools read. Everything is checked here, once, at construction: a bad
address, a missing or unreadable CA, certificate, key or token file is a :class:`ConfigError` naming the
option (or variable) and the path.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lbkit.errors import ConfigError

__all__ = [
    "DEFAULT_PORTS",
    "ConsulConnection",
    "check_optional_str",
    "check_token",
    "format_duration",
    "parse_consul_address",
    "resolve_connection",
]

DEFAULT_PORTS = {"http": 8500, "https": 8501}
_ENV = {
    "address": "CONSUL_HTTP_ADDR",
    "token": "CONSUL_HTTP_TOKEN",
    "token_file": "CONSUL_HTTP_TOKEN_FILE",
    "ca_file": "CONSUL_CACERT",
    "ca_path": "CONSUL_CAPATH",
    "cert_file": "CONSUL_CLIENT_CERT",
    "key_file": "CONSUL_CLIENT_KEY",
    "tls_server_name": "CONSUL_TLS_SERVER_NAME",
    "namespace": "CONSUL_NAMESPACE",
    "partition": "CONSUL_PARTITION",
}


def check_optional_str(owner: str, name: str, value: object, *, allow_empty: bool = False) -> None:
    """ConfigError unless ``value`` is None or a (non-empty) str."""
    if value is None:
        return
    if not isinstance(value, str) or (not value and not allow_empty):
        raise ConfigError(f"{owner}: {name} must be a non-empty str or None, got {value!r}")


def check_token(owner: str, value: object, name: str = "token") -> None:
    """ConfigError unless ``value`` is None or a usable token; the message never holds the token."""
    if value is None:
        return
    if not isinstance(value, str):
        raise ConfigError(f"{owner}: {name} must be a str or None, got a {type(value).__name__}")
    if not value or any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        raise ConfigError(f"{owner}: {name} must be non-empty, without spaces or control characters")


def _split_address(address: object, source: str) -> tuple[str | None, str, int | None]:
    if not isinstance(address, str) or not address or address != address.strip():
        raise ConfigError(f"bad Consul {source} {address!r}: expected 'host:port' or 'https://host:port'")
    text = address
    scheme: str | None = None
    if "://" in text:
        scheme, _, text = text.partition("://")
        scheme = scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ConfigError(
                f"bad Consul {source} {address!r}: scheme must be http or https, got {scheme!r}"
            )
        text = text[:-1] if text.endswith("/") else text
    if not text or any(c in text for c in "/?#@ \t"):
        raise ConfigError(f"bad Consul {source} {address!r}: expected 'host:port' or 'https://host:port'")
    try:
        parts = urllib.parse.urlsplit(f"//{text}")
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        raise ConfigError(f"bad Consul {source} {address!r}: the port is not a number in 1..65535") from None
    if not host or text.endswith(":"):
        raise ConfigError(f"bad Consul {source} {address!r}: expected 'host:port' or 'https://host:port'")
    if text.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"bad Consul {source} {address!r}: {host!r} is not an IPv6 address") from None
    elif text.count(":") > 1:
        raise ConfigError(f"bad Consul {source} {address!r}: put an IPv6 host in brackets, '[v6]:port'")
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"bad Consul {source} {address!r}: port {port} is not in 1..65535")
    return scheme, host, port


def parse_consul_address(address: object, *, source: str = "address") -> tuple[str, str, int]:
    """Split a Consul HTTP address (``host:port``, ``http://host:port``, ``https://host:port``,
    ``[v6]:port``) into (scheme, host, port). Without a port, Consul's default for the scheme is used
    (8500 for http, 8501 for https). Raise ConfigError naming a bad one."""
    scheme, host, port = _split_address(address, source)
    scheme = scheme or "http"
    return scheme, host, port if port is not None else DEFAULT_PORTS[scheme]


def format_duration(seconds: float) -> str:
    """A Go duration for Consul: whole seconds as ``"10s"``, anything else in milliseconds."""
    millis = max(1, round(seconds * 1000))
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


@dataclass(frozen=True)
class ConsulConnection:
    """Where and how to reach the Consul agent, after explicit options and the environment are merged.

    ``namespace`` and ``partition`` (Consul Enterprise) scope every request, as Consul's ``ns`` and
    ``partition`` query parameters. :attr:`ssl_context` is built (and its files read) when the
    connection is resolved, for https.
    """

    scheme: str
    host: str
    port: int
    token: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True
    ca_path: str | None = None
    tls_server_name: str | None = None
    """The name the agent's certificate must carry (and the SNI sent), instead of ``host``."""
    namespace: str | None = None
    partition: str | None = None
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    @property
    def address(self) -> str:
        """``scheme://host:port``, without any secret."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def http_verify(self) -> bool | str:
        """What py-consul's ``verify`` takes: the CA file when one is set, else a bool."""
        if self.verify and self.ca_file:
            return self.ca_file
        return self.verify

    @property
    def http_cert(self) -> str | tuple[str, str] | None:
        """What py-consul's ``cert`` takes: (cert, key), a combined file, or None."""
        if self.cert_file and self.key_file:
            return (self.cert_file, self.key_file)
        return self.cert_file

    def headers(self) -> dict[str, str]:
        """The request headers: the ACL token, when one is set."""
        return {"X-Consul-Token": self.token} if self.token else {}

    def scope_params(self) -> list[tuple[str, str]]:
        """The ``ns`` and ``partition`` query parameters, when set."""
        params = []
        if self.namespace:
            params.append(("ns", self.namespace))
        if self.partition:
            params.append(("partition", self.partition))
        return params

    def redact(self, text: str) -> str:
        """``text`` with the token, if present, replaced."""
        return text.replace(self.token, "<token>") if self.token else text


def _env_bool(env: Mapping[str, str], name: str) -> bool | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    value = raw.strip().lower()
    if value in ("1", "true", "t", "yes"):
        return True
    if value in ("0", "false", "f", "no"):
        return False
    raise ConfigError(f"bad {name} {raw!r}: expected true or false")


def _pick(owner: str, name: str, explicit: str | None, env: Mapping[str, str]) -> tuple[str | None, str]:
    """The explicit value, else the environment's (an empty variable counts as unset); with where it
    came from, for messages."""
    if explicit is not None:
        return explicit, f"{owner}: {name}"
    variable = _ENV[name]
    value = env.get(variable) or None
    return value, variable


def _readable_file(where: str, path: str | None) -> None:
    if path is None:
        return
    if not os.path.isfile(path):
        raise ConfigError(f"{where} {path!r} is not a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{where} {path!r} is not readable")


def _read_token_file(where: str, path: str) -> str | None:
    _readable_file(where, path)
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where} {path!r} could not be read: {type(exc).__name__}") from None
    if not text:
        return None  # as Consul's client: an empty token file leaves the token unset
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in text):
        raise ConfigError(f"{where} {path!r} holds a malformed token (spaces or control characters)")
    return text


def _ca_path_pems(where: str, directory: str) -> str:
    """Every PEM file of a CA directory, concatenated (as Consul's client loads CONSUL_CAPATH: each file
    in it, whatever its name, none of them unreadable or without a certificate)."""
    if not os.path.isdir(directory):
        raise ConfigError(f"{where} {directory!r} is not a directory")
    pems = []
    for path in sorted(Path(directory).rglob("*")):
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError):
            raise ConfigError(f"{where} {directory!r}: {str(path)!r} is not a readable PEM file") from None
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise ConfigError(f"{where} {directory!r}: {str(path)!r} holds no PEM certificate")
        pems.append(text)
    if not pems:
        raise ConfigError(f"{where} {directory!r} holds no certificate")
    return "\n".join(pems)


def _ssl_context(
    *,
    ca: tuple[str | None, str],
    ca_path: tuple[str | None, str],
    cert: tuple[str | None, str],
    key: tuple[str | None, str],
    verify: bool,
) -> ssl.SSLContext:
    """The client context, as Consul's client sets one up: the CA file, else every file of the CA
    directory, else the system's roots; the client certificate and key; TLS 1.2 or later."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca[0] is not None:
        try:
            ctx.load_verify_locations(cafile=ca[0])
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{ca[1]} {ca[0]!r} is not a PEM CA bundle: {exc}") from None
    elif ca_path[0] is not None:
        try:
            ctx.load_verify_locations(cadata=_ca_path_pems(ca_path[1], ca_path[0]))
        except ssl.SSLError as exc:
            raise ConfigError(
                f"{ca_path[1]} {ca_path[0]!r} holds a certificate that is not valid: {exc}"
            ) from None
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert[0] is not None:
        try:
            ctx.load_cert_chain(cert[0], key[0])
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"{cert[1]} {cert[0]!r} and {key[1]} {key[0]!r} are not a matching PEM certificate and key: "
                f"{exc}"
            ) from None
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def resolve_connection(
    *,
    address: str | None = None,
    token: str | None = None,
    token_file: str | None = None,
    ca_file: str | None = None,
    ca_path: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    verify: bool | None = None,
    tls_server_name: str | None = None,
    namespace: str | None = None,
    partition: str | None = None,
    env: Mapping[str, str] | None = None,
    owner: str = "Consul",
) -> ConsulConnection:
    """Merge explicit options with Consul's environment variables, explicit ones winning.

    Read as Consul's own tools read them: ``CONSUL_HTTP_ADDR`` (``https://`` selects TLS),
    ``CONSUL_HTTP_SSL``, ``CONSUL_HTTP_TOKEN``, ``CONSUL_HTTP_TOKEN_FILE`` (which wins over
    ``CONSUL_HTTP_TOKEN``, as in Consul's client), ``CONSUL_CACERT``, ``CONSUL_CAPATH``,
    ``CONSUL_CLIENT_CERT``, ``CONSUL_CLIENT_KEY``, ``CONSUL_HTTP_SSL_VERIFY``, ``CONSUL_TLS_SERVER_NAME``,
    ``CONSUL_NAMESPACE`` and ``CONSUL_PARTITION``. The default address is ``127.0.0.1:8500``. A client
    certificate needs its key and the key its certificate. Files are read now: a missing or unreadable
    one is a ConfigError naming the option (or variable) and the path.
    """
    env = os.environ if env is None else env
    check_optional_str(owner, "address", address)
    check_token(owner, token)
    for name, value in (
        ("token_file", token_file),
        ("ca_file", ca_file),
        ("ca_path", ca_path),
        ("cert_file", cert_file),
        ("key_file", key_file),
        ("tls_server_name", tls_server_name),
        ("namespace", namespace),
        ("partition", partition),
    ):
        check_optional_str(owner, name, value)
    if verify is not None and not isinstance(verify, bool):
        raise ConfigError(f"{owner}: verify must be a bool or None, got {verify!r}")
    if token is not None and token_file is not None:
        raise ConfigError(f"{owner}: pass token or token_file, not both")
    raw, source = (
        (address, "address") if address is not None else (env.get("CONSUL_HTTP_ADDR"), "CONSUL_HTTP_ADDR")
    )
    scheme, host, port = _split_address(raw or "127.0.0.1:8500", source)
    if scheme is None:
        scheme = "https" if _env_bool(env, "CONSUL_HTTP_SSL") else "http"
    if port is None:
        port = DEFAULT_PORTS[scheme]

    if token is None:
        file_value, file_where = _pick(owner, "token_file", token_file, env)
        if file_value is not None:
            token = _read_token_file(file_where, file_value)
        if token is None and token_file is None:
            env_token = env.get("CONSUL_HTTP_TOKEN") or None
            try:
                check_token(owner, env_token)
            except ConfigError:
                raise ConfigError(
                    f"{owner}: CONSUL_HTTP_TOKEN is malformed (spaces or control characters)"
                ) from None
            token = env_token

    ca = _pick(owner, "ca_file", ca_file, env)
    capath = _pick(owner, "ca_path", ca_path, env)
    cert = _pick(owner, "cert_file", cert_file, env)
    key = _pick(owner, "key_file", key_file, env)
    server_name, _ = _pick(owner, "tls_server_name", tls_server_name, env)
    ns, ns_where = _pick(owner, "namespace", namespace, env)
    part, part_where = _pick(owner, "partition", partition, env)
    if verify is None:
        env_verify = _env_bool(env, "CONSUL_HTTP_SSL_VERIFY")
        verify = True if env_verify is None else env_verify
    if (cert[0] is None) != (key[0] is None):
        given, missing = (cert, "key_file") if key[0] is None else (key, "cert_file")
        raise ConfigError(
            f"{given[1]} {given[0]!r} needs its pair ({missing}): a client certificate needs its key"
        )
    for value, where in (ca, cert, key):
        _readable_file(where, value)
    if server_name is not None:
        # As Consul's client: a host:port names the host part.
        server_name = urllib.parse.urlsplit(f"//{server_name}").hostname or server_name
    for value, where in ((ns, ns_where), (part, part_where)):
        if value is not None and value != value.strip():
            raise ConfigError(f"{where} {value!r} has spaces around it")
    context = None
    if scheme == "https":
        context = _ssl_context(ca=ca, ca_path=capath, cert=cert, key=key, verify=verify)
    elif capath[0] is not None:
        _ca_path_pems(capath[1], capath[0])  # checked even without TLS, like the files
    return ConsulConnection(
        scheme,
        host,
        port,
        token,
        ca[0],
        cert[0],
        key[0],
        verify,
        capath[0],
        server_name,
        ns,
        part,
        context,
    )
