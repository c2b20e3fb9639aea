"""py-spiffe's JWT-SVID calls against the agent's socket: WorkloadApiClient.fetch_jwt_svid for
the audiences given, validate_jwt_svid through the agent, JwtSource with parse_and_validate
against the JWT bundle the source streams, and the same token refused for an audience it was
not minted for. Prints one JSON line.

    python3 jwt_svid.py unix:///path/agent.sock AUDIENCE [AUDIENCE...]
"""
import json
import sys

from spiffe import JwtSource, WorkloadApiClient
from spiffe.svid.jwt_svid import JwtSvid


def main():
    socket, audiences = sys.argv[1], set(sys.argv[2:])
    first = sorted(audiences)[0]
    out = {}
    with WorkloadApiClient(socket) as client:
        svid = client.fetch_jwt_svid(audiences)
        again = client.fetch_jwt_svid(audiences)
        out["spiffe_id"] = str(svid.spiffe_id)
        out["audience"] = sorted(svid.audience) if not isinstance(svid.audience, str) else [svid.audience]
        out["expiry"] = svid.expiry
        out["token"] = svid.token
        out["same_token_again"] = again.token == svid.token
        validated = client.validate_jwt_svid(svid.token, first)
        out["validated_spiffe_id"] = str(validated.spiffe_id)
        try:
            client.validate_jwt_svid(svid.token, "not-an-audience-it-has")
            out["other_audience"] = "accepted"
        except Exception as e:  # the agent's refusal, as py-spiffe raises it
            out["other_audience"] = f"{type(e).__name__}: {e}"
    with JwtSource(socket_path=socket, timeout_in_seconds=10) as source:
        bundle = source.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        checked = JwtSvid.parse_and_validate(svid.token, bundle, {first})
        out["locally_validated"] = str(checked.spiffe_id)
        out["bundle_keys"] = len(bundle.jwt_authorities)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
