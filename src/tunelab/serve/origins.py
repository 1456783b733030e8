"""Which browsers may talk to the service: a Host check against DNS rebinding and an Origin check against
cross-site requests.

A web page can point a name of its own at 127.0.0.1 (DNS rebinding) and then read from and post to the local
server through the user's browser; the browser then sends that name as `Host`. A page on any site can also post
forms and `text/plain` bodies to the server without CORS asking first; the browser then names the page's site in
`Origin` (or `Referer`). Clients that are not browsers (the CLI, the Python and `openai` clients, curl) send
neither header and connect by the server's address, so both checks pass them.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from tunelab.config import UserError

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
DEFAULT_PORTS = {"http": 80, "https": 443}
ANY_ADDRESS = frozenset({"0.0.0.0", "::"})


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    address = _address(host)
    return address is not None and address.is_loopback  # a host name may resolve to anything


def normal_name(host: str) -> str:
    """The host as compared: lower case, without brackets or the one trailing dot of a fully qualified name."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.removesuffix(".")


def split_host(header: str) -> tuple[str, int | None]:
    """A Host header as (name, port): 'Example.COM.:8321' -> ('example.com', 8321), '[::1]:80' -> ('::1', 80).
    Raises ValueError for a malformed one."""
    header = header.strip()
    if header.startswith("["):
        name, closed, rest = header[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise ValueError(header)
        port = rest[1:]
    elif header.count(":") == 1:
        name, port = header.split(":")
    else:  # a name, or an IPv6 address without brackets (no port can follow it)
        name, port = header, ""
    if port and not port.isdigit():
        raise ValueError(header)
    name = normal_name(name)
    if not name or any(c in name for c in "[]/@?#\\ "):
        raise ValueError(header)
    return name, int(port) if port else None


def parse_origin(value: str) -> tuple[str, str, int]:
    """'HTTP://Example.com' -> ('http', 'example.com', 80): what browsers compare as an origin. Also reads the
    origin of a full URL (a Referer). Raises ValueError for anything without an http(s) scheme and a host."""
    parts = urlsplit(value.strip())
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError(value)
    return scheme, normal_name(parts.hostname), parts.port or DEFAULT_PORTS[scheme]


def check_allowed_origin(value: str) -> str:
    """An --allowed-origin value, checked: scheme://host[:port] and nothing more."""
    if value.strip().lower() == "null":
        raise UserError("--allowed-origin null would let any sandboxed page or local file in; name a site "
                         "as scheme://host[:port]")
    try:
        parse_origin(value)
        parts = urlsplit(value.strip())
    except ValueError:
        raise UserError(f"--allowed-origin {value!r} is not an origin: write scheme://host[:port], e.g. "
                         "http://localhost:3000") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username is not None:
        raise UserError(f"--allowed-origin {value!r} is not an origin: write scheme://host[:port] alone, "
                         "without path, query or user")
    return value


def check_allowed_host(value: str) -> str:
    """An --allowed-host value, checked: a host name or address, optionally with a port (which is ignored)."""
    try:
        split_host(value)
    except ValueError:
        raise UserError(f"--allowed-host {value!r} is not a host name: write a name or address such as "
                         "box.lan or 10.0.0.5") from None
    return value


def _shown(value: str) -> str:
    return repr(value if len(value) <= 100 else value[:100] + "...")


class BrowserPolicy:
    """The Host names and the Origins one server answers. Each check returns None, or why it refuses."""

    def __init__(self, bound_host: str, allowed_hosts: list[str], allowed_origins: list[str]):
        self.bound = normal_name(bound_host)
        self.hosts = {split_host(h)[0] for h in allowed_hosts}
        self.origins = {parse_origin(o) for o in allowed_origins}

    def host_allowed(self, name: str) -> bool:
        if is_loopback(name) or name == self.bound or name in self.hosts:
            return True
        # Bound to every interface, clients reach the server by any of its addresses; a rebinding page always
        # names a domain of its own, never an address.
        return self.bound in ANY_ADDRESS and _address(name) is not None

    def host_refusal(self, header: str | None) -> str | None:
        if header is None:  # only a non-browser client omits Host (HTTP/1.0)
            return None
        try:
            name, _ = split_host(header)
        except ValueError:
            return f"refused: malformed Host header {_shown(header)}"
        if self.host_allowed(name):
            return None
        return (f"refused: Host {_shown(header)} is not a name this server answers to (a web page may be trying DNS "
                f"rebinding); if clients reach it by that name, start the server with --allowed-host {name}")

    def origin_refusal(self, method: str, scheme: str, host: str | None, origin: str | None,
                       referer: str | None) -> str | None:
        if method not in STATE_CHANGING:
            return None
        header, value = ("Origin", origin) if origin is not None else ("Referer", referer)
        if value is None:
            return None
        if value.strip().lower() == "null":  # a sandboxed frame, a local file, a data: URL: no site to trust
            return (f"refused: {method} from an opaque origin (Origin: null, a sandboxed page or local file); only "
                    "the server's own pages and sites named with --allowed-origin may change its state")
        try:
            site = parse_origin(value)
        except ValueError:
            return f"refused: {method} from {header} {_shown(value)}, which names no http(s) site"
        if site in self.origins or (host is not None and site == self._own(scheme, host)):
            return None
        scheme_, name, port = site
        allow = f"{scheme_}://{f'[{name}]' if ':' in name else name}"
        allow += "" if port == DEFAULT_PORTS[scheme_] else f":{port}"
        return (f"refused: cross-site {method} from {header} {_shown(value)}; if that site may drive this server, "
                f"start it with --allowed-origin {allow}")

    @staticmethod
    def _own(scheme: str, host: str) -> tuple[str, str, int] | None:
        """The origin of the server's own pages: the scheme the request came by and the name it was sent to."""
        try:
            name, port = split_host(host)
        except ValueError:
            return None
        scheme = scheme.lower()
        return scheme, name, port or DEFAULT_PORTS.get(scheme, 80)
