"""Two workloads making mTLS with spiffe-tls (PyPI), each with the SVID its own agent serves.

    python3 mtls_pair.py server HOST:PORT unix:///a.sock spiffe://td/ns/x/sa/client
    python3 mtls_pair.py client HOST:PORT unix:///b.sock spiffe://td/ns/x/sa/server SECONDS

The server answers each connection's "ping" with "pong"; the client dials every 0.2 s. Each
side prints one JSON line per connection: whether it worked, the peer's certificate issuer
and its own.
"""
import json
import logging
import socket as socket_module
import sys
import time


from spiffe import SpiffeId, X509Source
from spiffetls import ListenOptions, ServerTlsMode, dial, listen
from spiffetls.tlsconfig.authorize import authorize_id


def own_issuer(source):
    return source.get_x509_context().default_svid.leaf.issuer.rfc4514_string()


def peer_issuer(conn):
    cert = conn.get_peer_certificate()
    return cert.to_cryptography().issuer.rfc4514_string() if cert else None


class _ReusableSocket(socket_module.socket):
    """A listening socket that can be bound again at once (past the last connection's
    TIME_WAIT), for `listen` to create."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_REUSEADDR, 1)


def serve(address, socket, peer):
    # spiffe-tls 0.4 with pyOpenSSL 26 cannot apply an update to a context once it has made a
    # connection ("Context has already been used to create a Connection"), so a listener
    # keeps its first SVID and bundle; this workload listens anew for each connection, which
    # takes the source's current SVID and bundle.
    source = X509Source(socket_path=socket, timeout_in_seconds=10)
    options = ListenOptions(tls_mode=ServerTlsMode.MTLS, authorize_fn=authorize_id(SpiffeId(peer)))
    socket_module.socket = _ReusableSocket  # what `listen` creates, in this process
    announced = False
    while True:
        listener = listen(address, source, options)
        if not announced:
            print(json.dumps({"listening": address}), flush=True)
            announced = True
        try:
            conn, _ = listener.accept()
            conn.do_handshake()
            data = conn.recv(16)
            conn.sendall(b"pong" if data == b"ping" else b"what")
            print(json.dumps({"ok": True, "peer_issuer": peer_issuer(conn), "own_issuer": own_issuer(source)}), flush=True)
            conn.shutdown()
            conn.close()
        except Exception as e:  # a failed handshake is reported, and the server goes on
            print(json.dumps({"ok": False, "error": str(e)}), flush=True)
        finally:
            listener.close()


def client(address, socket, peer, seconds):
    source = X509Source(socket_path=socket, timeout_in_seconds=10)
    end = time.time() + seconds
    while time.time() < end:
        try:
            conn = dial(address, source, authorize_fn=authorize_id(SpiffeId(peer)))
            conn.sendall(b"ping")
            answer = conn.recv(16)
            print(json.dumps({"ok": answer == b"pong", "peer_issuer": peer_issuer(conn), "own_issuer": own_issuer(source)}), flush=True)
            conn.close()
        except Exception as e:
            print(json.dumps({"ok": False, "error": str(e)}), flush=True)
        time.sleep(0.2)


if __name__ == "__main__":
    # Each dial or listen makes a context that stays subscribed to the source, and on
    # pyOpenSSL 26 each update it cannot apply is logged with a traceback; the connections
    # themselves use the current SVID and bundle, and their outcome is what this prints.
    logging.getLogger("spiffe.workloadapi.x509_source").setLevel(logging.CRITICAL)
    mode, address, socket, peer = sys.argv[1:5]
    if mode == "server":
        serve(address, socket, peer)
    else:
        client(address, socket, peer, float(sys.argv[5]))
