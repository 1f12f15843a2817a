"""The grpcio stubs the build generates (modelstate_proto.v1) beside the client package, in one
process, against the test daemon."""
import grpc
import torch

import modelstate
from modelstate_proto.v1 import model_state_pb2, model_state_pb2_grpc


def test_stubs_and_client_import_side_by_side_and_name_the_wire_package():
    assert modelstate.connect is not None
    assert model_state_pb2.DESCRIPTOR.package == "modelstate.v1"
    service = model_state_pb2.DESCRIPTOR.services_by_name["ModelState"]
    assert service.full_name == "modelstate.v1.ModelState"


def test_stubs_fetch_what_the_client_loaded(daemon, client, fresh_name):
    name = fresh_name()
    net = torch.nn.Linear(3, 2)
    client.create(name, net)
    with grpc.insecure_channel(daemon.address) as channel:
        stub = model_state_pb2_grpc.ModelStateStub(channel)
        responses = list(stub.StateDict(model_state_pb2.StateDictRequest(model=name),
                                        timeout=60))
    manifest = responses[0].manifest
    assert [t.name for t in manifest.tensors] == ["weight", "bias"]
    data = b"".join(r.chunk.data for r in responses if r.HasField("chunk"))
    assert responses[-1].HasField("end")
    expected = b"".join(t.detach().numpy().tobytes() for t in net.state_dict().values())
    assert data == expected
    assert manifest.version == client.info(name).version
