"""The dashboard and alerts the chart installs: well-formed, and naming only metrics the services really export.

The exported names come from the live /metrics of the real stack (Triton through the project's launcher, the
draft service and the orchestrator on loopback) after it served real requests; the alerts are read from the
chart as the real helm binary renders it (ci/monitoring-values.yaml turns everything on).
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import json
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import promql_parser
import pytest
import yaml

from harness.stack import LocalStack, StackConfig, free_port
from specrec.model_identity import artifact_version
from specrec.v1 import recommend_pb2 as pb
from specrec.v1 import recommend_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "specrec"
DASHBOARD = CHART / "dashboards" / "specrec.json"
SCHEMA = Path(__file__).parent / "schemas" / "grafana-dashboard.schema.json"
# Grafana's variables, replaced by what they expand to before the PromQL is parsed.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$namespace": "specrec"}
CLIENT_METHODS = ("Recommend", "StreamRecommend", "Generate")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries() -> list[str]:
    queries = [t["expr"] for p in panels(dashboard()) for t in p.get("targets", [])]
    for var in dashboard()["templating"]["list"]:  # label_values(METRIC, LABEL): its metric must exist too
        if var["type"] == "query":
            queries.append(re.fullmatch(r"label_values\((\w+), *\w+\)", var["definition"]).group(1))
    return queries


def expand(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects, from its syntax tree."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if type(node).__name__ == "VectorSelector":
            names.add(node.name)
            return
        for attr in ("lhs", "rhs", "expr", "param", "vector_selector"):
            child = getattr(node, attr, None)
            if child is not None:
                walk(child)
        for arg in getattr(node, "args", None) or ():
            walk(arg)

    walk(promql_parser.parse(expand(expr)))
    return names


@pytest.fixture(scope="module")
def rendered_rules() -> list[dict[str, Any]]:
    helm = subprocess.run([str(REPO / "scripts" / "fetch_helm.sh")], check=True, capture_output=True, text=True,
                          timeout=600).stdout.strip().splitlines()[-1]
    text = subprocess.run([helm, "template", "rec", str(CHART), "--namespace", "specrec", "-f",
                           str(CHART / "ci" / "monitoring-values.yaml")],
                          check=True, capture_output=True, text=True, timeout=120).stdout
    docs = [d for d in yaml.safe_load_all(text) if d]
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"  # what Grafana's sidecar looks for
    assert json.loads(configmap["data"]["specrec.json"]) == dashboard()
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


# ----------------------------------------------------------------------------------------- no stack needed


def test_dashboard_passes_the_grafana_dashboard_schema():
    jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text())).validate(dashboard())


@pytest.mark.parametrize("break_it", [
    lambda d: d["panels"][1]["gridPos"].update(w=25),  # wider than Grafana's 24-column grid
    lambda d: d["panels"][1].update(colour="red"),  # a field the (closed) panel kind does not have
    lambda d: d["panels"][1].pop("fieldConfig"),
    lambda d: d.update(uid="short"),
])
def test_the_schema_rejects_broken_dashboards(break_it):
    broken = copy.deepcopy(dashboard())
    break_it(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text())).validate(broken)


def test_dashboard_panels_have_unique_ids_and_do_not_overlap():
    dash = dashboard()
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels(dash):
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert g["x"] + g["w"] <= 24 and not mine & cells, p["title"]
        cells |= mine


def test_dashboard_shows_what_the_issue_asks_for():
    titles = " | ".join(p["title"].lower() for p in panels(dashboard()))
    for wanted in ("latency", "tokens per round", "acceptance per draft position", "fallback", "refusal",
                   "triton batch size", "queue time", "per pod", "time to first item"):
        assert wanted in titles, wanted
    queries = " ".join(dashboard_queries())
    assert "by (pod)" in queries and "by (drafter, policy)" in queries


def test_every_query_parses_as_promql(rendered_rules):
    for expr in dashboard_queries() + [r["expr"] for r in rendered_rules]:
        assert metric_names(expr), expr


def test_alerts_cover_errors_refusals_fallbacks_acceptance_restarts_and_versions(rendered_rules):
    assert {r["alert"] for r in rendered_rules} == {
        "SpecrecHighErrorRate", "SpecrecRefusingRequests", "SpecrecDrafterFallbacks", "SpecrecAcceptanceCollapse",
        "SpecrecTritonRestarted", "SpecrecModelVersionMismatch"}
    for rule in rendered_rules:
        assert 'namespace="specrec"' in rule["expr"], rule["alert"]  # one release's series only
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


# ----------------------------------------------------------------------------------------- the real stack


@pytest.fixture(scope="module")
def live(tiny_artifacts, tiny_drafter):
    config = StackConfig(artifacts=tiny_artifacts.directory, policy="adaptive", metrics_port=free_port(),
                         draft_metrics_port=free_port())
    with LocalStack(config) as stack:
        yield stack


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def exported_names(text: str) -> set[str]:
    """Every sample name a /metrics page exports, including families declared but without a series yet
    (a labelled counter that has not counted anything, e.g. fallbacks)."""
    names = {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines() if line and line[0] != "#"}
    for kind_line in re.finditer(r"^# TYPE (\S+) (\w+)$", text, re.MULTILINE):
        name, kind = kind_line.groups()
        suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}.get(kind, ("",))
        names |= {name + suffix for suffix in suffixes}
    return names


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s series whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, _, value = line.rpartition(" ")
            if all(f'{key}="{val}"' in series for key, val in labels.items()):
                total += float(value)
    return total


def drive_traffic(stack: LocalStack, arts) -> None:
    """What an SRE's dashboard sees in a minute: unary and streaming requests, and a bad one."""
    history = [arts.data.item_ids[i] for i in arts.split.train[5][-20:]]
    with grpc.insecure_channel(stack.orchestrator_addr) as ch:
        stub = pb_grpc.RecommenderServiceStub(ch)

        def one(user: int) -> None:
            h = [arts.data.item_ids[i] for i in arts.split.train[user][-20:]]
            stub.Recommend(pb.RecommendRequest(history=h, num_items=10), timeout=60)

        with cf.ThreadPoolExecutor(4) as pool:  # concurrent: Triton batches trees of several sequences
            list(pool.map(one, range(8)))
        chunks = list(stub.StreamRecommend(pb.StreamRecommendRequest(request=pb.RecommendRequest(history=history,
                                                                                 num_items=5)), timeout=60))
        assert chunks[-1].HasField("done")
        with pytest.raises(grpc.RpcError) as refused:
            stub.Recommend(pb.RecommendRequest(history=["no-such-item"], num_items=5, strict_history=True), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_every_metric_in_dashboard_and_alerts_is_exported(live, tiny_artifacts, rendered_rules):
    drive_traffic(live, tiny_artifacts)
    pages = {name: scrape(url) for name, url in live.metrics_urls().items()}
    assert set(pages) == {"orchestrator", "draft", "target"}
    exported = set().union(*(exported_names(text) for text in pages.values()))
    for expr in dashboard_queries() + [r["expr"] for r in rendered_rules]:
        missing = metric_names(expr) - exported
        assert not missing, f"{sorted(missing)} in {expr!r} are exported by no service"


def test_requests_are_counted_by_method_and_status_code(live, tiny_artifacts):
    url = live.metrics_urls()["orchestrator"]
    before = scrape(url)
    drive_traffic(live, tiny_artifacts)
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    # The server counts a call when its handler returns; the client may see the refusal's status a moment before
    # (one clean-clone run scraped 0 here), so wait briefly for the count rather than race it.
    deadline = time.monotonic() + 5
    while delta("specrec_requests_total", method="Recommend", code="INVALID_ARGUMENT") < 1 \
            and time.monotonic() < deadline:
        time.sleep(0.05)
        after = scrape(url)

    assert delta("specrec_requests_total", method="Recommend", code="OK") == 8
    assert delta("specrec_requests_total", method="Recommend", code="INVALID_ARGUMENT") == 1
    assert delta("specrec_requests_total", method="StreamRecommend", code="OK") == 1
    assert delta("specrec_time_to_first_item_seconds_count", method="StreamRecommend") == 1
    # round series carry the drafter, policy and mode that served them
    assert delta("specrec_spec_decode_num_drafts_total", drafter="model", policy="adaptive", mode="greedy") > 0
    assert delta("specrec_request_latency_seconds_count", drafter="model", policy="adaptive", mode="greedy") == 9
    draft = scrape(live.metrics_urls()["draft"])
    assert sample(draft, "specrec_requests_total", method="Speculate", code="OK") > 0
    for page in (after, draft):
        assert sample(page, "process_resident_memory_bytes") > 1e6


def test_all_three_services_report_the_same_model_version(live, tiny_artifacts):
    version = artifact_version(Path(tiny_artifacts.directory).resolve())
    for name, url in live.metrics_urls().items():
        assert sample(scrape(url), "specrec_model_info", version=version) == 1, name
