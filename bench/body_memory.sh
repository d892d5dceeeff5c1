#!/bin/bash
# Server memory with large request bodies: five 8 MiB uploads (curl, its own
# process) to a Python handler hashing req.body, served by the haikutx of
# source tree TREE on 127.0.0.1:PORT; prints the time taken and how much the
# server's peak resident size (VmHWM, reset just before) grew.
#
#   bench/body_memory.sh TREE PORT      (root, for /proc/PID/clear_refs)
set -eu
TREE=$(cd "$1" && pwd); PORT=$2
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/h"
printf '%s\n' 'import hashlib' 'body = req.body' \
  "res.end(f'{len(body)} {hashlib.sha256(body).hexdigest()}')" > "$WORK/h/digest.py"
head -c 8388608 /dev/urandom > "$WORK/body"
PYTHON=${PYTHON:-/work/venv/bin/python}
cd "$TREE"
PYTHONPATH="$TREE" "$PYTHON" -c "from twisted.scripts.twistd import run; run()" -n --pidfile= \
  haiku --port "tcp:$PORT:interface=127.0.0.1" --sslport none --workers 2 -r 0 \
  --handlers "$WORK/h" --maxtime 30000 > "$WORK/log" 2>&1 &
PID=$!
URL="http://127.0.0.1:$PORT/?x-haiku-handler=digest.py"
for _ in $(seq 100); do curl -s -o /dev/null "$URL" && break; sleep 0.1; done
echo 5 > "/proc/$PID/clear_refs"
BEFORE=$(awk '/VmRSS/ {print $2}' "/proc/$PID/status")
START=$(date +%s.%N)
for _ in 1 2 3 4 5; do
  curl -s -o /dev/null -w '%{http_code} ' --data-binary @"$WORK/body" \
    -H 'Content-Type: application/octet-stream' "$URL"
done
END=$(date +%s.%N)
PEAK=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")
echo; echo "5 x 8 MiB: $(echo "$END - $START" | bc) s; server RSS ${BEFORE} kB, peak ${PEAK} kB, growth $((PEAK - BEFORE)) kB"
kill "$PID"; wait "$PID" 2>/dev/null || true
