"""The service in-process, on the real reactor and a real socket."""

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.client import HTTPConnectionPool

from dache.config import default_config
from dache.engines import REGISTRY
from dache.service import DacheService
from dache.store.cache import value_of


@pytest_twisted.inlineCallbacks
def test_stopping_lets_an_in_flight_write_finish_and_be_acknowledged(monkeypatch):
    monkeypatch.setitem(REGISTRY, "held", "tests.engines:HeldEngine")
    service = DacheService(
        default_config(durability_engine="held", listen="tcp:0:interface=127.0.0.1"), reactor
    )
    service.startService()
    yield service.ready
    url = f"http://127.0.0.1:{service.port.getHost().port}/dache/k"
    pool = HTTPConnectionPool(reactor, persistent=False)

    response = treq.post(url, json={"value": "in flight"}, pool=pool)
    yield service.engine.arrived
    stopped = service.stopService()
    assert not stopped.called  # waiting for the write

    service.engine.release()
    response = yield response
    assert response.code == 204
    yield stopped
    assert value_of(service.cache.get("k", reactor.seconds())) == "in flight"
    refused = []  # and new writes are refused from now on
    service.committer.submit(object()).addErrback(refused.append)
    assert "shutting down" in str(refused[0].value)
