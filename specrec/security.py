"""Transport security for every hop: TLS / mTLS credentials from PEM files, and bearer-token auth on the client API.

Files are how Kubernetes mounts Secrets, so everything here is a path; key and token contents are
never logged (their reprs are masked) and the token is compared in constant time.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"  # probes carry no token
_TRUE = ("1", "true", "yes", "on")


class SecurityConfigError(ValueError):
    """The TLS / token settings are inconsistent or a file is unreadable; the message names the setting."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise SecurityConfigError(f"{what} {path}: cannot read it ({err.strerror})") from None


@dataclass(frozen=True)
class TlsConfig:
    """One process's TLS identity and trust.

    cert/key: the PEM chain and key this process presents: as a server on its listener, and as a
        client to peers that ask for a client certificate (mTLS), so the certificate should carry
        both the serverAuth and clientAuth extended key usages.
    ca: PEM bundle that verifies peers: the servers this process calls, and, with client_auth, the
        clients of its own listener. Empty = the system roots (client side only).
    client_auth: the listener requires a client certificate signed by `ca` (mTLS).
    system_roots: dial peers over TLS even with neither cert nor ca, trusting the system roots
        (a client of a server with a publicly trusted certificate).
    """

    cert: str = ""
    key: str = ""
    ca: str = ""
    client_auth: bool = False
    system_roots: bool = False

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise SecurityConfigError("TLS needs both a certificate and its key (SPECREC_TLS_CERT and "
                                      "SPECREC_TLS_KEY / --tls-cert and --tls-key), or neither")
        if self.client_auth and not self.ca:
            raise SecurityConfigError("client authentication (SPECREC_TLS_CLIENT_AUTH) needs the CA that signs "
                                      "client certificates: set SPECREC_TLS_CA / --tls-ca")
        if self.client_auth and not self.cert:
            raise SecurityConfigError("client authentication needs TLS on the listener: set SPECREC_TLS_CERT and "
                                      "SPECREC_TLS_KEY")

    @property
    def on(self) -> bool:
        """Peers are dialled over TLS."""
        return bool(self.system_roots or self.cert or self.ca)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """Credentials for `add_secure_port`, or None when this listener stays plaintext (no cert)."""
        if not self.cert:
            return None
        pair = [(_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))]
        if not self.client_auth:  # no client certificate asked for: the CA only verifies the peers we call
            return grpc.ssl_server_credentials(pair)
        return grpc.ssl_server_credentials(pair, root_certificates=_read(self.ca, "TLS CA"), require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """Credentials for `secure_channel`, or None when peers are dialled in plaintext."""
        if not self.on:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "TLS CA") if self.ca else None,
            private_key=_read(self.key, "TLS key") if self.key else None,
            certificate_chain=_read(self.cert, "TLS certificate") if self.cert else None,
        )

    def triton_kwargs(self, server_name: str = "") -> dict[str, Any]:
        """Keyword arguments of tritonclient's InferenceServerClient (grpc and grpc.aio): it reads the files.

        `server_name`: the name Triton's certificate must carry when it differs from the dialled host."""
        if not self.on:
            return {}
        kwargs: dict[str, Any] = {"ssl": True}
        if self.ca:
            kwargs["root_certificates"] = self.ca
        if self.cert:
            kwargs.update(private_key=self.key, certificate_chain=self.cert)
        if server_name:  # channel_args replaces tritonclient's defaults, so they are repeated here
            kwargs["channel_args"] = [*_triton_channel_defaults(), *name_override(server_name)]
        return kwargs

    def triton_server_args(self) -> list[str]:
        """tritonserver flags serving gRPC with this identity (mutual when client_auth)."""
        if not self.cert:
            return []
        args = ["--grpc-use-ssl=true", f"--grpc-server-cert={self.cert}", f"--grpc-server-key={self.key}"]
        if self.ca:
            args.append(f"--grpc-root-cert={self.ca}")
        if self.client_auth:
            args.append("--grpc-use-ssl-mutual=true")
        return args

    def describe(self) -> str:
        """For logs: which mode, and file paths only."""
        if not self.on:
            return "plaintext"
        mode = "mTLS" if self.client_auth else "TLS"
        return f"{mode} (cert {self.cert or '-'}, CA {self.ca or 'system roots'})"


@dataclass(frozen=True)
class AuthConfig:
    """Bearer token for the client API: from a file (a mounted Secret, re-read when it changes) or the env."""

    token_file: str = ""
    token: str = field(default="", repr=False)

    @property
    def on(self) -> bool:
        return bool(self.token_file or self.token)

    def source(self) -> TokenSource | None:
        return TokenSource(self.token_file, self.token) if self.on else None


class TokenSource:
    """The current token; a file is re-read when its mtime changes, so a rotated Secret takes effect."""

    def __init__(self, path: str = "", value: str = ""):
        self._path = path
        self._value = value.encode()
        self._mtime: float | None = None
        self.get()  # an unreadable or empty file fails at start, not at the first request

    def __repr__(self) -> str:
        return f"TokenSource(file={self._path or '-'}, token=***)"

    def get(self) -> bytes:
        if not self._path:
            return self._value
        try:
            mtime = os.stat(self._path).st_mtime
        except OSError as err:
            if self._value:  # keep serving with the last good token while a Secret is being swapped
                return self._value
            raise SecurityConfigError(f"token file {self._path}: cannot read it ({err.strerror})") from None
        if mtime != self._mtime:
            value = _read(self._path, "token file").strip()
            if not value:
                if self._value:  # caught mid-write: keep the last good token, read again next time
                    return self._value
                raise SecurityConfigError(f"token file {self._path} is empty")
            self._value, self._mtime = value, mtime
        return self._value


def read_token(config: AuthConfig) -> str:
    """The token for a client to send ("" when none is configured)."""
    source = config.source()
    return source.get().decode() if source else ""


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC but health checks unless it carries `authorization: Bearer <token>` (UNAUTHENTICATED)."""

    def __init__(self, tokens: TokenSource):
        self._tokens = tokens

    def _refusal(self, metadata: Any) -> str | None:
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return "missing 'authorization: Bearer <token>' metadata: this server requires a bearer token"
        scheme, _, token = (values[0] if isinstance(values[0], str) else values[0].decode()).partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "the authorization metadata must read 'Bearer <token>'"
        if not hmac.compare_digest(token.strip().encode(), self._tokens.get()):
            return "the bearer token is not valid for this server"
        return None

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        reason = self._refusal(details.invocation_metadata)
        return handler if reason is None else _refusing(handler, reason)


def _refusing(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that aborts with UNAUTHENTICATED."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    kind = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kind[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def name_override(server_name: str) -> list[tuple[str, str]]:
    """Channel options verifying the peer's certificate against `server_name` instead of the dialled host:
    the orchestrator dials pod IPs (EndpointSlice routing) while certificates name the Service."""
    return [("grpc.ssl_target_name_override", server_name)] if server_name else []


def _triton_channel_defaults() -> list[tuple[str, Any]]:
    from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions

    k = KeepAliveOptions()
    return [("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", k.keepalive_time_ms), ("grpc.keepalive_timeout_ms", k.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", k.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", k.http2_max_pings_without_data)]


def add_port(server: grpc.aio.Server | grpc.Server, address: str, tls: TlsConfig) -> int:
    """Bind `address` with TLS when the config has a certificate, else in plaintext; returns the port."""
    creds = tls.server_credentials()
    return server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)


def aio_channel(address: str, tls: TlsConfig, server_name: str = "", options: Any = (),
                **kwargs: Any) -> grpc.aio.Channel:
    """An asyncio channel to `address`, over TLS when the config says so (kwargs: interceptors, ...).

    `server_name`: the name the peer's certificate must carry when it is not the dialled host."""
    creds = tls.channel_credentials()
    if creds is None:
        return grpc.aio.insecure_channel(address, options=list(options), **kwargs)
    return grpc.aio.secure_channel(address, creds, options=[*options, *name_override(server_name)], **kwargs)


def channel(address: str, tls: TlsConfig, server_name: str = "", options: Any = (), **kwargs: Any) -> grpc.Channel:
    """A blocking channel to `address` (CLI, health checks), over TLS when the config says so."""
    creds = tls.channel_credentials()
    if creds is None:
        return grpc.insecure_channel(address, options=list(options), **kwargs)
    return grpc.secure_channel(address, creds, options=[*options, *name_override(server_name)], **kwargs)


async def start_probe_listener(health_servicer: Any, host: str, port: int) -> grpc.aio.Server | None:
    """A plaintext listener serving only grpc.health.v1 from `health_servicer` (None when port is 0).

    Kubelet's native gRPC probes cannot speak TLS; this port answers them while the API port
    requires TLS. It reveals nothing but SERVING / NOT_SERVING."""
    if not port:
        return None
    from grpc_health.v1 import health_pb2_grpc

    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    log.info("health probes (plaintext, grpc.health.v1 only) on %s:%d", host, bound)
    return server


def add_probe_port_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probe-port", type=int, default=int(os.environ.get("SPECREC_PROBE_PORT", "0")),
                   help="plaintext port serving only gRPC health checks, for kubelet probes when TLS is on; "
                        "0 = off (env SPECREC_PROBE_PORT)")


def server_interceptors(auth: AuthConfig) -> list[grpc.aio.ServerInterceptor]:
    source = auth.source()
    return [BearerTokenInterceptor(source)] if source else []


def add_tls_args(p: argparse.ArgumentParser, client_only: bool = False) -> None:
    """--tls-* flags with SPECREC_TLS_* environment defaults."""
    env = os.environ.get
    p.add_argument("--tls-cert", default=env("SPECREC_TLS_CERT", ""),
                   help="PEM certificate chain presented by this process (env SPECREC_TLS_CERT)")
    p.add_argument("--tls-key", default=env("SPECREC_TLS_KEY", ""),
                   help="PEM private key of --tls-cert (env SPECREC_TLS_KEY)")
    p.add_argument("--tls-ca", default=env("SPECREC_TLS_CA", ""),
                   help="PEM CA bundle that verifies peers (env SPECREC_TLS_CA)")
    p.add_argument("--tls", action="store_true", default=env("SPECREC_TLS", "").lower() in _TRUE,
                   help="dial over TLS even without --tls-ca (system roots) (env SPECREC_TLS=1)")
    if not client_only:
        p.add_argument("--tls-client-auth", action="store_true",
                       default=env("SPECREC_TLS_CLIENT_AUTH", "").lower() in _TRUE,
                       help="require client certificates signed by --tls-ca: mTLS (env SPECREC_TLS_CLIENT_AUTH=1)")


def add_auth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token-file", default=os.environ.get("SPECREC_AUTH_TOKEN_FILE", ""),
                   help="file holding the bearer token (env SPECREC_AUTH_TOKEN_FILE; or the token itself in "
                        "env SPECREC_AUTH_TOKEN, never on the command line)")


def tls_from_args(a: argparse.Namespace) -> TlsConfig:
    return TlsConfig(cert=a.tls_cert, key=a.tls_key, ca=a.tls_ca,
                     client_auth=getattr(a, "tls_client_auth", False), system_roots=a.tls)


def auth_from_args(a: argparse.Namespace) -> AuthConfig:
    """The token settings; an unreadable or empty token file fails here, at start-up."""
    config = AuthConfig(token_file=a.token_file, token="" if a.token_file else os.environ.get("SPECREC_AUTH_TOKEN", ""))
    config.source()
    return config
