"""What a relying party (a cloud provider, Vault) does with the CA's OIDC discovery, with
PyJWT: fetch `<issuer>/.well-known/openid-configuration` over TLS trusting CA_FILE, then
the signing keys from its `jwks_uri` with PyJWKClient. Prints one JSON line.

    python3 oidc_keys.py https://localhost:PORT CA_FILE
With a third argument, a JWT: also verifies it (ES256, the issuer, audience `test`).
"""
import json
import ssl
import sys
import urllib.request

import jwt
from jwt import PyJWKClient


def main():
    issuer, ca_file = sys.argv[1], sys.argv[2]
    context = ssl.create_default_context(cafile=ca_file)
    with urllib.request.urlopen(f"{issuer}/.well-known/openid-configuration", context=context) as r:
        document = json.load(r)
    client = PyJWKClient(document["jwks_uri"], ssl_context=context)
    keys = client.get_signing_keys()
    out = {
        "issuer": document["issuer"],
        "jwks_uri": document["jwks_uri"],
        "algs": document["id_token_signing_alg_values_supported"],
        "kids": [k.key_id for k in keys],
        "key_types": [type(k.key).__name__ for k in keys],
    }
    if len(sys.argv) > 3:
        token = sys.argv[3]
        key = client.get_signing_key_from_jwt(token)
        claims = jwt.decode(token, key.key, algorithms=["ES256"], audience="test", issuer=document["issuer"])
        out["claims"] = claims
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
