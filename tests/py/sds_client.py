"""An SDS client from Envoy's own protos (PyPI xds-protos) against the agent's socket.

    python3 sds_client.py unix:///path/agent.sock NAME SECONDS [nack]

Opens StreamSecrets for NAME, prints one JSON line per response received, and ACKs each
(or, with `nack`, NACKs the first and ACKs the rest), for SECONDS seconds. Errors are printed
as {"error": code, "message": ...}.
"""
import json
import queue
import sys
import threading
import time

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc import status_pb2

SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def describe(response):
    secrets = []
    for any_ in response.resources:
        secret = secret_pb2.Secret()
        any_.Unpack(secret)
        entry = {"name": secret.name, "type_url": any_.type_url}
        if secret.HasField("tls_certificate"):
            entry["chain"] = secret.tls_certificate.certificate_chain.inline_bytes.decode()
            entry["key"] = secret.tls_certificate.private_key.inline_bytes.decode()
        if secret.HasField("validation_context"):
            entry["trusted_ca"] = secret.validation_context.trusted_ca.inline_bytes.decode()
        secrets.append(entry)
    return {"version": response.version_info, "nonce": response.nonce,
            "type_url": response.type_url, "secrets": secrets}


def main():
    target, name, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    nack_first = len(sys.argv) > 4 and sys.argv[4] == "nack"
    channel = grpc.insecure_channel(target.replace("unix://", "unix:", 1))
    stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
    requests = queue.Queue()
    node = base_pb2.Node(id="sidecar~10.0.0.1~web.shop~shop.svc.cluster.local", cluster="web.shop")
    requests.put(discovery_pb2.DiscoveryRequest(node=node, resource_names=[name], type_url=SECRET))

    def outgoing():
        while True:
            item = requests.get()
            if item is None:
                return
            yield item

    def reader():
        accepted = ""
        first = True
        try:
            for response in stub.StreamSecrets(outgoing()):
                print(json.dumps(describe(response)), flush=True)
                if first and nack_first:
                    detail = status_pb2.Status(code=3, message="bad certificate (a test's NACK)")
                    requests.put(discovery_pb2.DiscoveryRequest(
                        node=node, resource_names=[name], type_url=SECRET, version_info=accepted,
                        response_nonce=response.nonce, error_detail=detail))
                else:
                    accepted = response.version_info
                    requests.put(discovery_pb2.DiscoveryRequest(
                        node=node, resource_names=[name], type_url=SECRET, version_info=accepted,
                        response_nonce=response.nonce))
                first = False
        except grpc.RpcError as e:
            print(json.dumps({"error": e.code().name, "message": e.details()}), flush=True)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(seconds)
    requests.put(None)


if __name__ == "__main__":
    main()
