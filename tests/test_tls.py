"""TLS on every hop: the real stack (Triton, drafter, orchestrator) with mTLS and a bearer token.

Certificates are made here (harness.devcerts, on `cryptography`): a CA, one identity for the services (serverAuth and
clientAuth, SAN 127.0.0.1 and localhost), and an impostor identity with the same names signed by
another CA. Lists over mTLS must equal plain greedy decoding; every client without the right
certificate or token must be refused.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.devcerts import make_ca, make_identity
from harness.stack import LocalStack, StackConfig, free_port
from orchestrator.config import OrchestratorConfig
from specrec.cli import main as cli_main
from specrec.decoding.plain import decode
from specrec.draft.v1 import draft_pb2, draft_pb2_grpc
from specrec.security import SecurityConfigError, TlsConfig, TokenSource, add_port, auth_metadata, channel
from specrec.v1 import recommend_pb2 as pb
from specrec.v1 import recommend_pb2_grpc as pb_grpc
from tests.test_monitoring import sample, scrape

USERS = [0, 1, 2]


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path
    rogue_cert: Path  # same names, signed by another CA
    rogue_key: Path
    token: str
    token_file: Path

    def tls(self) -> TlsConfig:
        return TlsConfig(cert=str(self.cert), key=str(self.key), ca=str(self.ca), client_auth=True)

    def rogue(self) -> TlsConfig:
        """Trusts the real CA (so the server is accepted) but presents a certificate the services never signed."""
        return TlsConfig(cert=str(self.rogue_cert), key=str(self.rogue_key), ca=str(self.ca))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "specrec-test-ca")
    node = make_identity(d, "specrec-node", ca)  # SAN localhost and 127.0.0.1
    rogue = make_identity(d, "rogue-node", make_ca(d, "rogue-ca"))
    token = secrets.token_urlsafe(24)
    token_file = d / "token"
    token_file.write_text(token + "\n")  # a trailing newline, as `kubectl create secret --from-file` often has
    return Pki(ca.path, node.cert, node.key, rogue.cert, rogue.key, token, token_file)


@pytest.fixture(scope="module")
def reference(tiny_artifacts, tiny_target) -> dict[int, list[str]]:
    decoded = decode(tiny_target, tiny_artifacts.constraint(), [tiny_artifacts.prompt(u) for u in USERS])
    return {u: [tiny_artifacts.data.item_ids[i] for i in d.items] for u, d in zip(USERS, decoded, strict=True)}


@pytest.fixture(scope="module")
def stack(tiny_artifacts, tiny_drafter, pki, tmp_path_factory):
    config = StackConfig(artifacts=tiny_artifacts.directory, drafter="model", policy="fixed:3:8", tls=pki.tls(),
                         token_file=pki.token_file, log_dir=tmp_path_factory.mktemp("logs"),
                         probe_ports=True, metrics_port=free_port())
    with LocalStack(config) as s:
        yield s


def request(arts, user: int) -> pb.RecommendRequest:
    history = [arts.data.item_ids[i] for i in arts.split.train[user][-arts.profile.max_history:]]
    return pb.RecommendRequest(history=history, num_items=10)


def refusal(addr: str, tls: TlsConfig, metadata: tuple = (), arts=None) -> grpc.StatusCode:
    """The status a Recommend call gets (OK when it is served)."""
    with channel(addr, tls) as ch:
        try:
            pb_grpc.RecommenderServiceStub(ch).Recommend(request(arts, 0), timeout=30, metadata=metadata)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def draft_refusal(addr: str, tls: TlsConfig, server_name: str = "") -> grpc.StatusCode:
    with channel(addr, tls, server_name) as ch:
        try:
            draft_pb2_grpc.DraftServiceStub(ch).Stats(draft_pb2.StatsRequest(), timeout=10)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def triton_refuses(addr: str, tls: TlsConfig, server_name: str = "") -> bool:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    try:
        grpcclient.InferenceServerClient(addr, **tls.triton_kwargs(server_name)).is_server_ready(client_timeout=10)
    except InferenceServerException:
        return True
    return False


def test_lists_over_mtls_with_token_equal_plain_greedy(stack, pki, tiny_artifacts, reference):
    with channel(stack.orchestrator_addr, pki.tls()) as ch:
        stub = pb_grpc.RecommenderServiceStub(ch)
        for user, expected in reference.items():
            resp = stub.Recommend(request(tiny_artifacts, user), timeout=60, metadata=auth_metadata(pki.token))
            assert [i.item_id for i in resp.items] == expected
            assert resp.stats.drafted_tokens > 0  # the drafter hop works over mTLS too


def test_stream_recommend_needs_the_token_too(stack, pki, tiny_artifacts, reference):
    with channel(stack.orchestrator_addr, pki.tls()) as ch:
        stub = pb_grpc.RecommenderServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.StreamRecommend(pb.StreamRecommendRequest(request=request(tiny_artifacts, 0)), timeout=30))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        chunks = list(stub.StreamRecommend(pb.StreamRecommendRequest(request=request(tiny_artifacts, 0)), timeout=60,
                                           metadata=auth_metadata(pki.token)))
    assert [c.item.item_id for c in chunks if c.WhichOneof("kind") == "item"] == reference[0]


def test_plaintext_clients_are_refused_on_every_hop(stack, pki, tiny_artifacts):
    plain = TlsConfig()
    assert refusal(stack.orchestrator_addr, plain, auth_metadata(pki.token), tiny_artifacts) == \
        grpc.StatusCode.UNAVAILABLE
    assert draft_refusal(stack.draft_addr, plain) == grpc.StatusCode.UNAVAILABLE
    assert triton_refuses(stack.target_addr, plain)


def test_a_certificate_from_another_ca_is_refused(stack, pki, tiny_artifacts):
    md = auth_metadata(pki.token)
    assert refusal(stack.orchestrator_addr, pki.rogue(), md, tiny_artifacts) == grpc.StatusCode.UNAVAILABLE
    assert draft_refusal(stack.draft_addr, pki.rogue()) == grpc.StatusCode.UNAVAILABLE
    assert triton_refuses(stack.target_addr, pki.rogue())
    # TLS without any client certificate: refused too (mTLS), while the right one is served
    no_cert = TlsConfig(ca=str(pki.ca))
    assert refusal(stack.orchestrator_addr, no_cert, md, tiny_artifacts) == grpc.StatusCode.UNAVAILABLE
    assert draft_refusal(stack.draft_addr, no_cert) == grpc.StatusCode.UNAVAILABLE
    assert triton_refuses(stack.target_addr, no_cert)
    assert draft_refusal(stack.draft_addr, pki.tls()) == grpc.StatusCode.OK
    assert not triton_refuses(stack.target_addr, pki.tls())


def test_peers_are_checked_against_the_name_the_orchestrator_is_told(stack, pki):
    """With pod-IP routing the orchestrator dials IPs and checks the Service name instead (--draft-tls-name,
    --target-tls-name): the right name passes, any other is refused."""
    assert draft_refusal(stack.draft_addr, pki.tls(), "localhost") == grpc.StatusCode.OK
    assert draft_refusal(stack.draft_addr, pki.tls(), "rec-specrec-draft.specrec.svc") == grpc.StatusCode.UNAVAILABLE
    assert not triton_refuses(stack.target_addr, pki.tls(), "localhost")
    assert triton_refuses(stack.target_addr, pki.tls(), "rec-specrec-triton.specrec.svc")


@pytest.mark.parametrize("metadata", [(), auth_metadata("not-the-token"), (("authorization", "Basic Zm9vOmJhcg=="),),
                                      (("authorization", "Bearer "),)], ids=["missing", "wrong", "basic", "empty"])
def test_a_missing_or_wrong_token_is_unauthenticated(stack, pki, tiny_artifacts, metadata):
    with channel(stack.orchestrator_addr, pki.tls()) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.RecommenderServiceStub(ch).Recommend(request(tiny_artifacts, 0), timeout=30, metadata=metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "token" in err.value.details() or "Bearer" in err.value.details()


def test_refused_tokens_are_counted_as_unauthenticated(stack, pki, tiny_artifacts):
    url = stack.metrics_urls()["orchestrator"]
    before = sample(scrape(url), "specrec_requests_total", method="Recommend", code="UNAUTHENTICATED")
    with channel(stack.orchestrator_addr, pki.tls()) as ch, pytest.raises(grpc.RpcError):
        pb_grpc.RecommenderServiceStub(ch).Recommend(request(tiny_artifacts, 0), timeout=30)
    after = sample(scrape(url), "specrec_requests_total", method="Recommend", code="UNAUTHENTICATED")
    assert after == before + 1  # the auth interceptor's refusal is counted, though no handler ran


def test_health_checks_need_no_token(stack, pki):
    with channel(stack.orchestrator_addr, pki.tls()) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_probe_ports_answer_plaintext_health_checks_and_nothing_else(stack, tiny_artifacts):
    """Kubelet's gRPC probes cannot speak TLS: each service has a plaintext port serving only health."""
    for name, addr in stack.probe_addrs.items():
        with grpc.insecure_channel(addr) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, name
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.RecommenderServiceStub(ch).Recommend(request(tiny_artifacts, 0), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, name
            with pytest.raises(grpc.RpcError) as err:
                draft_pb2_grpc.DraftServiceStub(ch).Stats(draft_pb2.StatsRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, name
    assert set(stack.probe_addrs) == {"draft", "orchestrator"}


def test_cli_recommend_speaks_tls_and_sends_the_token(stack, pki, reference, tiny_artifacts, capsys):
    tls_args = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.cert), "--tls-key", str(pki.key)]
    base = ["recommend", "--dataset", "ml-100k", "--profile", "tiny", "--addr", stack.orchestrator_addr,
            "--user", tiny_artifacts.data.user_ids[0], *tls_args]
    assert cli_main([*base, "--token-file", str(pki.token_file)]) == 0
    out = capsys.readouterr().out
    titles = dict(zip(tiny_artifacts.data.item_ids, tiny_artifacts.data.titles, strict=True))
    assert titles[reference[0][0]] in out
    with pytest.raises(SystemExit) as exit_:
        cli_main(base)
    assert "UNAUTHENTICATED" in str(exit_.value)


def test_the_logs_hold_neither_the_token_nor_the_key(stack, pki, tiny_artifacts):
    refusal(stack.orchestrator_addr, pki.tls(), auth_metadata(pki.token + "x"), tiny_artifacts)  # a near miss
    key_body = pki.key.read_text().splitlines()[1]
    logs = {p.name: p.read_text(errors="replace") for p in stack.log_dir.glob("*.log")}
    assert set(logs) == {"target.log", "draft.log", "orchestrator.log"}
    assert "mTLS" in logs["orchestrator.log"]  # the logs do say how the listener is secured
    for name, text in logs.items():
        assert pki.token not in text, name
        assert key_body not in text, name


def test_inconsistent_settings_fail_with_a_message_naming_the_setting(tmp_path):
    with pytest.raises(SecurityConfigError, match="SPECREC_TLS_KEY"):
        TlsConfig(cert="server.crt")
    with pytest.raises(SecurityConfigError, match="SPECREC_TLS_CA"):
        TlsConfig(cert="a", key="b", client_auth=True)
    with pytest.raises(SecurityConfigError, match="cannot read"):
        TlsConfig(cert=str(tmp_path / "missing.crt"), key="k").server_credentials()
    with pytest.raises(SystemExit):  # argparse's error: the message on stderr, exit code 2
        OrchestratorConfig.from_args(["--artifacts", str(tmp_path), "--tls-cert", "only-a-cert.pem"])
    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(SystemExit):
        OrchestratorConfig.from_args(["--artifacts", str(tmp_path), "--token-file", str(empty)])


def test_a_rotated_token_file_takes_effect_without_a_restart(tmp_path):
    path = tmp_path / "token"
    path.write_text("first\n")
    tokens = TokenSource(str(path))
    assert tokens.get() == b"first"
    path.write_text("second")
    os.utime(path, (1, 1))  # a new mtime, as when Kubernetes swaps the Secret's files
    assert tokens.get() == b"second"
    path.write_text("")  # caught mid-write: the last good token stays
    os.utime(path, (2, 2))
    assert tokens.get() == b"second"
    assert "second" not in repr(tokens)


@pytest.mark.parametrize("client_auth", [False, True])
def test_the_api_admits_clients_without_a_certificate_unless_told_otherwise(pki, client_auth):
    """The chart's default API listener: TLS with the CA mounted, yet no client certificate asked for."""
    from concurrent import futures

    from grpc_health.v1 import health

    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = add_port(server, "127.0.0.1:0", TlsConfig(cert=str(pki.cert), key=str(pki.key), ca=str(pki.ca),
                                                     client_auth=client_auth))
    server.start()
    try:
        with channel(f"127.0.0.1:{port}", TlsConfig(ca=str(pki.ca))) as ch:
            try:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
    finally:
        server.stop(None)
    assert code == (grpc.StatusCode.UNAVAILABLE if client_auth else grpc.StatusCode.OK)
