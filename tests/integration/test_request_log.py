"""Servers with a request log record each call that carries an x-request-id as it starts executing, so a
run can count calls executed twice; lines written before a server is killed are kept."""

from __future__ import annotations

from pathlib import Path

import grpc

from lbkit.testing.model_server import REQUEST_ID_HEADER, ModelServer
from lbkit.testing.server_process import ServerProcess
from tests.integration.conftest import pb2, pb2_grpc


def _lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()]


def test_each_call_with_a_request_id_is_recorded_once_per_execution(tmp_path: Path) -> None:
    log = tmp_path / "requests.log"
    with ModelServer(request_log=str(log)) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb2_grpc.ModelServiceStub(channel)
        stub.Predict(pb2.PredictRequest(), metadata=[(REQUEST_ID_HEADER, "r1")], timeout=5)
        stub.Predict(pb2.PredictRequest(), metadata=[(REQUEST_ID_HEADER, "r1")], timeout=5)
        stub.Predict(pb2.PredictRequest(), timeout=5)  # no id: not recorded
        list(stub.StreamPredict(pb2.PredictRequest(max_tokens=2), metadata=[(REQUEST_ID_HEADER, "s1")]))
        updates = iter([pb2.FeatureUpdate(entity_id="e", sequence=1)])
        list(stub.UpdateFeatures(updates, metadata=[(REQUEST_ID_HEADER, "b1")], timeout=5))
        address = server.address
    lines = _lines(log)
    assert [line[1:] for line in lines] == [
        ["r1", "Predict", address],
        ["r1", "Predict", address],
        ["s1", "StreamPredict", address],
        ["b1", "UpdateFeatures", address],
    ]
    times = [float(line[0]) for line in lines]
    assert times == sorted(times)


def test_one_file_for_servers_in_several_processes_survives_a_kill(tmp_path: Path) -> None:
    log = tmp_path / "requests.log"
    with ServerProcess(2, processes=True, request_log=str(log)) as servers:
        for index, address in enumerate(servers.addresses):
            with grpc.insecure_channel(address) as channel:
                stub = pb2_grpc.ModelServiceStub(channel)
                stub.Predict(pb2.PredictRequest(), metadata=[(REQUEST_ID_HEADER, f"id{index}")], timeout=5)
        servers.command("kill 0")
        servers.command("start 0")
        with grpc.insecure_channel(servers.addresses[0]) as channel:
            stub = pb2_grpc.ModelServiceStub(channel)
            stub.Predict(pb2.PredictRequest(), metadata=[(REQUEST_ID_HEADER, "after")], timeout=5)
        addresses = servers.addresses
    assert sorted(line[1:] for line in _lines(log)) == sorted(
        [
            ["id0", "Predict", addresses[0]],
            ["id1", "Predict", addresses[1]],
            ["after", "Predict", addresses[0]],
        ]
    )
