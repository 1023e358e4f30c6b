"""One trace id across a deploy on RabbitMQ, over two containers (#16 §5), and a plain AMQP client's
trace context continued in its reply.

Deploy runs in one container, Fetch, Cache and Unpack in another, both on the test's own vhost. A
client process starts a deploy with a known ``traceparent``; a plain pika consumer bound to the
system exchange with ``#`` sees every message of the system. Every request and answer of the
deploy's conversations (deploy, fetch, lock, new_staging, publish, unlock, unpack...) carries that
trace id, each with a parent id of its own; with the OpenTelemetry SDK (in-memory exporter) the
client and server spans of both containers carry it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pika
import pytest
import pytest_twisted
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from twisted.internet import threads

from ion.core import trace
from ion.services.deploy.service import DeployClient, DeployService
from ion.services.deploy.spec import load_deployment
from ion.testing import ContainerFactory, client_process
from tests.core.support import EchoService
from tests.hostile.pika_client import PlainClient

from .scenario_support import CONTENT, item, system_config, within, write_deployment, write_tree

pytestmark = pytest.mark.amqp

SYS = "tracesys"
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACE = "0af7651916cd43dd8448eb211c80319c"
#: The ops of a deploy's conversations (requests; their answers are matched by conv-id).
CHAIN_OPS = {"deploy", "fetch", "lock", "renew", "new_staging", "publish", "unlock", "discard_staging",
             "unpack", "detect", "lookup", "cancel"}


class Tap:
    """A plain pika consumer of every message of the system exchange (``#``), read after the fact."""

    def __init__(self, url: str, sysname: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(self.queue, f"ion.{sysname}", "#")

    def drain(self) -> list[dict[str, Any]]:
        got = []
        while True:
            method, _props, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return got
            got.append(msgpack.unpackb(body, raw=False, strict_map_key=False))

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


async def _deploy_over_two_containers(amqp_url: str, tmp_path: Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Run one deploy (three items, file: repository) with ``traceparent: TP``; returns every message the
    tap saw and the container id of each side."""
    (tmp_path / "dest").mkdir()
    root = write_tree(tmp_path / "repos" / "repo", CONTENT)
    config = {**system_config(tmp_path), "ion.services.cache": {
        "root": str(tmp_path / "cache"), "host_id": "test-host", "verify_interval": 0, "reap_interval": 0}}
    factory = ContainerFactory(broker_url=amqp_url)
    tap: Tap | None = None
    try:
        services = await factory(sysname=SYS, config=config)
        await services.app_manager.start_app("fetch")  # with cache and unpack
        front = await factory(sysname=SYS, config=config)
        await front.spawn(DeployService)
        tap = await threads.deferToThread(Tap, amqp_url, SYS)
        proc = await client_process(front)
        dest = tmp_path / "dest"
        spec = load_deployment(write_deployment(tmp_path / "deployment.json", f"file://{root}", [
            item("zlib", "1.2", dest / "zlib"), item("tool", "3.0", dest / "tool"),
            item("notes", "1.0", dest / "notes")]))
        content, reply = await within(proc.rpc_send("deploy", "deploy", DeployClient.request_content(spec),
                                                    headers={"traceparent": TP}, timeout=60))
        assert reply["traceparent"][3:35] == TRACE
        assert (dest / "zlib/zlib/include/zlib.h").exists()
        seen = await threads.deferToThread(tap.drain)
        return seen, {"front": front.id, "services": services.id}
    finally:
        if tap is not None:
            await threads.deferToThread(tap.close)
        await factory.teardown()


def _check_one_trace(seen: list[dict[str, Any]], ids: dict[str, str], *, spans: bool = False) -> None:
    chain_convs = {m["conv-id"] for m in seen if m.get("op") in CHAIN_OPS and m.get("performative") == "request"}
    chain = [m for m in seen if m["conv-id"] in chain_convs]
    assert {m["op"] for m in chain} >= {"deploy", "fetch", "lock", "new_staging", "publish", "unlock", "unpack",
                                        "result"}
    # both containers' processes sent some of them
    senders = {m["sender"].split(".")[0] if not m["sender"].startswith(ids["front"]) else "front" for m in chain}
    assert "front" in senders and any(m["sender"].startswith(ids["services"]) for m in chain)
    traces = {m["traceparent"][3:35] for m in chain}
    assert traces == {TRACE}, sorted((m["op"], m["sender"], m["traceparent"]) for m in chain
                                     if m["traceparent"][3:35] != TRACE)
    if spans:
        # every request its own parent id (its CLIENT span's); the answers of one request (an agree,
        # then the result) share their SERVER span's
        parents = [m["traceparent"][36:52] for m in chain if m["performative"] == "request"]
        assert len(set(parents)) == len(parents)
    else:
        # no SDK, no span of any hop: the one traceparent goes through unchanged (OpenTelemetry's
        # no-op propagation), parent id included
        assert len({m["traceparent"] for m in chain}) == 1
    assert all(trace.parse(m["traceparent"]) for m in chain)


@pytest_twisted.ensureDeferred
async def test_a_deploy_is_one_trace_across_two_containers(amqp_url: str, tmp_path: Path) -> None:
    """Without an SDK: the headers alone carry the trace, Deploy to Fetch to Cache and Unpack and back."""
    assert trace.state.tracer is None
    seen, ids = await _deploy_over_two_containers(amqp_url, tmp_path)
    _check_one_trace(seen, ids)


@pytest_twisted.ensureDeferred
async def test_a_deploy_is_one_trace_of_spans_across_two_containers(amqp_url: str, tmp_path: Path,
                                                                     spans: InMemorySpanExporter) -> None:
    """With the SDK: the messages' context is their spans', and the spans of both containers are one trace."""
    seen, ids = await _deploy_over_two_containers(amqp_url, tmp_path)
    _check_one_trace(seen, ids, spans=True)
    finished = [s for s in spans.get_finished_spans() if s.attributes.get("rpc.method") in CHAIN_OPS]
    assert {f"{s.context.trace_id:032x}" for s in finished} == {TRACE}
    kinds = {(s.kind, s.attributes["rpc.method"]) for s in finished}
    for op in ("deploy", "fetch", "lock", "publish", "unpack"):
        assert {(SpanKind.CLIENT, op), (SpanKind.SERVER, op)} <= kinds, op
    assert {s.attributes["messaging.system"] for s in finished} == {"rabbitmq"}
    by_id = {s.context.span_id: s for s in finished}
    # every SERVER span's parent is the CLIENT span of its request (in whichever container it ran)
    for s in finished:
        if s.kind == SpanKind.SERVER:
            assert by_id[s.parent.span_id].kind == SpanKind.CLIENT
            assert by_id[s.parent.span_id].attributes["messaging.message.conversation_id"] == \
                s.attributes["messaging.message.conversation_id"]
    # and each message's traceparent is the context of the span that sent it
    requests = {m["traceparent"][36:52] for m in seen if m.get("op") in CHAIN_OPS and m["performative"] == "request"}
    assert requests <= {f"{s.context.span_id:016x}" for s in finished if s.kind == SpanKind.CLIENT}


# -- a plain AMQP client ---------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_a_plain_amqp_client_gets_its_trace_id_back(amqp_url: str) -> None:
    """pika, no ioncore: a request with a traceparent gets a reply of the same trace id (its own parent
    id); one without, or with a malformed one, gets a reply that starts a new trace."""
    factory = ContainerFactory(broker_url=amqp_url)
    try:
        container = await factory(sysname=SYS)
        await container.spawn(EchoService)

        def calls() -> list[dict[str, Any] | None]:
            client = PlainClient(amqp_url, SYS)
            try:
                return [client.call(f"{SYS}.echo", "echo", "with", headers={"traceparent": TP, "tracestate": "k=v"}),
                        client.call(f"{SYS}.echo", "echo", "without"),
                        client.call(f"{SYS}.echo", "echo", "bad", headers={"traceparent": "00-zz-01"})]
            finally:
                client.close()

        with_tp, without, bad = await threads.deferToThread(calls)
    finally:
        await factory.teardown()
    assert with_tp is not None and with_tp["content"] == "with"
    assert with_tp["traceparent"] == TP  # (no SDK here: no span of ours to be a new parent id)
    assert trace.parse(with_tp["traceparent"]) and with_tp["tracestate"] == "k=v"
    for reply in (without, bad):
        assert reply is not None and reply["status"] == "OK"
        assert trace.parse(reply["traceparent"]) is not None
    assert without["traceparent"][3:35] != bad["traceparent"][3:35] != TRACE  # type: ignore[index]
