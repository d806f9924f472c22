#!/bin/sh
# Writes the test PKI under tests/fixtures/tls (committed; regenerate only if it must change):
#   ca.pem           a test CA (100 years)
#   server.pem/.key  a server certificate signed by it for localhost, 127.0.0.1 and ::1
#   other-ca.pem     an unrelated CA (clients trusting only it must refuse the server)
# Operators make their own the same way (docs/operations.md, "TLS"). Needs the openssl CLI.
set -eu
out="${1:-$(dirname "$0")/../tests/fixtures/tls}"
mkdir -p "$out"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 36500 \
    -subj "/CN=AITBC test CA" -keyout "$tmp/ca.key" -out "$out/ca.pem" 2>/dev/null
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 36500 \
    -subj "/CN=AITBC other CA" -keyout "$tmp/other.key" -out "$out/other-ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=localhost" \
    -keyout "$out/server.key" -out "$tmp/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' > "$tmp/ext"
openssl x509 -req -in "$tmp/server.csr" -CA "$out/ca.pem" -CAkey "$tmp/ca.key" -CAcreateserial \
    -days 36500 -extfile "$tmp/ext" -out "$out/server.pem" 2>/dev/null
echo "wrote $out/ca.pem, $out/server.pem, $out/server.key, $out/other-ca.pem"
