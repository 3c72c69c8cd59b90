#!/bin/sh
# Writes a self-signed certificate for localhost / 127.0.0.1 next to this
# script (config/test-cert.pem, config/test-key.pem) for config/tls.conf.
set -eu
dir=$(dirname "$0")
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 365 \
  -subj '/CN=localhost' -addext 'subjectAltName=DNS:localhost,IP:127.0.0.1' \
  -keyout "$dir/test-key.pem" -out "$dir/test-cert.pem" 2>/dev/null
echo "wrote $dir/test-cert.pem and $dir/test-key.pem"
