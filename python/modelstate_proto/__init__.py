"""grpcio stubs of modelstate's wire protocol, the proto package modelstate.v1
(docs/protocol.md), generated at build time from
proto/modelstate/v1/model_state.proto:

    import grpc
    from modelstate_proto.v1 import model_state_pb2, model_state_pb2_grpc
    stub = model_state_pb2_grpc.ModelStateStub(grpc.insecure_channel(target))

For programs that speak the protocol themselves with python3-grpcio; the
``modelstate`` package is the client for torch. The stubs are a package of
their own, so that both can be imported side by side.
"""
