"""py-spiffe's X509Source against the agent's socket: prints one JSON line for the first
X.509 context and one for each update the source reports, for SECONDS seconds.

    python3 x509_source.py unix:///path/agent.sock SECONDS
"""
import json
import sys
import time

from cryptography.hazmat.primitives import serialization
from spiffe import X509Source


def public(key):
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def report(source, event):
    svid = source.get_x509_context().default_svid
    bundle = source.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    leaf = svid.leaf
    print(json.dumps({
        "event": event,
        "spiffe_id": str(svid.spiffe_id),
        "serial": format(leaf.serial_number, "x"),
        "issuer": leaf.issuer.rfc4514_string(),
        "chain": len(svid.cert_chain),
        "key_matches": public(svid.private_key.public_key()) == public(leaf.public_key()),
        "roots": sorted(c.subject.rfc4514_string() for c in bundle.x509_authorities),
    }), flush=True)


def main():
    socket, seconds = sys.argv[1], float(sys.argv[2])
    source = X509Source(socket_path=socket, timeout_in_seconds=10)
    report(source, "initial")
    source.subscribe_for_updates(lambda: report(source, "update"))
    time.sleep(seconds)
    source.close()


if __name__ == "__main__":
    main()
