#!/usr/bin/env bash
# Local S3-compatible test server (moto, from the project .venv) on 127.0.0.1, free port.
# Not a production server: in-memory, no auth checks. Used by the storage conformance suite
# (storage/tests/) and by end-to-end checkpoint tests.
#
#   eval "$(scripts/s3_server.sh start)"   # start (or reuse) the server, create the test bucket,
#                                          # print `export` lines (AWS_* + MLA_TEST_S3_*)
#   scripts/s3_server.sh env               # print the export lines of the running server again
#   scripts/s3_server.sh stop              # stop it
#
# The bucket named by MLA_TEST_S3_BUCKET (default mla-test) is created here, right after the
# server answers, so tests only need the environment. Credentials are dummies; the secret is
# random so tests can check it never shows up in error messages.
# State (pid, env, log) lives in .cache/s3_server/ (gitignored).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${MLA_VENV:-$ROOT/.venv}
PY=$VENV/bin/python
STATE=$ROOT/.cache/s3_server
PIDFILE=$STATE/pid
ENVFILE=$STATE/env
LOG=$STATE/log
BUCKET=${MLA_TEST_S3_BUCKET:-mla-test}

running() {
  [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

start() {
  if running && [[ -f $ENVFILE ]]; then
    cat "$ENVFILE"
    return 0
  fi
  if [[ ! -x $VENV/bin/moto_server ]]; then
    echo "s3_server: $VENV/bin/moto_server not found; run: $PY -m pip install 'moto[server]'" >&2
    exit 1
  fi
  mkdir -p "$STATE"
  local port
  port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # setsid: the server survives the shell that started it (test scripts, eval in a subshell).
  setsid "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >"$LOG" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$PIDFILE"
  local secret
  secret=mla-dummy-secret-$("$PY" -c 'import secrets; print(secrets.token_hex(8))')
  # Wait until it answers (up to 30 s), then create the bucket.
  if ! AWS_ACCESS_KEY_ID=mla-dummy-key-id AWS_SECRET_ACCESS_KEY=$secret \
    "$PY" - "$port" "$BUCKET" <<'EOF' >&2; then
import sys, time, urllib.request
import boto3
port, bucket = sys.argv[1], sys.argv[2]
url = f"http://127.0.0.1:{port}"
deadline = time.time() + 30
while True:
    try:
        urllib.request.urlopen(url + "/", timeout=1).read()
        break
    except Exception as e:
        if time.time() > deadline:
            sys.exit(f"s3_server: no answer from {url} after 30 s: {e}")
        time.sleep(0.2)
boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=bucket)
EOF
    echo "s3_server: start failed; log: $LOG" >&2
    kill "$pid" 2>/dev/null || true
    rm -f "$PIDFILE"
    exit 1
  fi
  cat >"$ENVFILE" <<EOF
export AWS_ENDPOINT_URL=http://127.0.0.1:$port
export AWS_ACCESS_KEY_ID=mla-dummy-key-id
export AWS_SECRET_ACCESS_KEY=$secret
export AWS_REGION=us-east-1
export AWS_ALLOW_HTTP=true
export MLA_TEST_S3_BUCKET=$BUCKET
export MLA_TEST_S3_PID=$pid
EOF
  cat "$ENVFILE"
}

stop() {
  if [[ -f $PIDFILE ]]; then
    local pid
    pid=$(cat "$PIDFILE")
    # A test may have paused it (SIGSTOP) to simulate an outage.
    kill -CONT "$pid" 2>/dev/null || true
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$PIDFILE" "$ENVFILE"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  env) if running && [[ -f $ENVFILE ]]; then cat "$ENVFILE"; else echo "s3_server: not running" >&2; exit 1; fi ;;
  *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
