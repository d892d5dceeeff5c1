#!/bin/sh
# Requests/s: directly to a Twisted hello backend, through the haikutx gate,
# and through PicoLisp's httpGate, on loopback with wrk, with keep-alive and
# with a new connection per request (Connection: close), all in one run.
# For the haikutx gate it also prints the CPU time the gate process spent
# per request (from /proc, so it means something on a shared machine too),
# and for every run the CPU time the backend spent per request (the
# yardstick: the gate's own cost beside an application's). With keep-alive
# it also measures the backend directly with the X-Forwarded-* fields the
# gate adds ("direct+fwd"): any proxy that adds them makes the backend parse
# them, so haikutx/direct+fwd is the gate's own share of the slowdown.
#
#   sh bench/gate_bench.sh [seconds] [connections] [rounds]
#
# With keep-alive it also runs nginx (one worker, upstream keep-alive, the
# same X-Forwarded-* fields) as the yardstick of a proxy written in C on the
# same two cores, and prints wrk's own CPU per request: the client, the
# proxy and the application share the machine's cores.
#
# Needs: wrk, nginx, GNU time, picolisp (Debian's, for bin/httpGate); PY and
# TWISTD name the Python and twistd of an environment with haikutx's
# dependencies.
set -eu
cd "$(dirname "$0")/.."
DUR=${1:-10}
CONN=${2:-16}
ROUNDS=${3:-1}
PY=${PY:-.venv/bin/python}
BACK=18181 GATE=18180 PIL=18182 NGX=18183
NGXDIR=$(mktemp -d)
HTTPGATE=$(dpkg -L picolisp | grep '/bin/httpGate$')
PIDS=""
cleanup() {
    for p in $PIDS; do kill "$p" 2>/dev/null || true; done
    sleep 1
    for p in $PIDS; do kill -KILL "$p" 2>/dev/null || true; done
    rm -rf "$NGXDIR"
}
trap cleanup EXIT INT TERM

wait_port() {
    i=0
    until "$PY" -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 1)" 2>/dev/null; do
        i=$((i + 1)); [ $i -lt 100 ] || { echo "port $1 never opened" >&2; exit 1; }
        sleep 0.1
    done
}

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

run() { # name url [wrk options]: prints "name req/s [proxy-cpu/req] backend-cpu/req wrk-cpu/req"
    name=$1 url=$2; shift 2
    case $name in haikutx) proxy=$GATEPID;; nginx) proxy=$NGXPID;; *) proxy=$BACKPID;; esac
    t0=$(ticks "$proxy") b0=$(ticks "$BACKPID")
    /usr/bin/time -f "%U %S" -o /tmp/gate_bench_wrk_cpu.txt \
        wrk -t1 -c"$CONN" -d"${DUR}s" "$@" "$url" > /tmp/gate_bench_$name.txt
    t1=$(ticks "$proxy") b1=$(ticks "$BACKPID")
    rps=$(awk '/Requests\/sec/ {print $2}' /tmp/gate_bench_$name.txt)
    n=$(awk '/requests in/ {print $1}' /tmp/gate_bench_$name.txt)
    w=$(awk '{print $1 + $2}' /tmp/gate_bench_wrk_cpu.txt)
    "$PY" -c "
us = lambda a, b: f'{(b - a) * 1e6 / $(getconf CLK_TCK) / $n:.0f}us/req'
label = {'haikutx': 'gate', 'nginx': 'nginx'}.get('$name')
proxy = f'{label} {us($t0, $t1)}' if label else ''
print('$name', $rps, proxy, 'backend', us($b0, $b1), f'wrk {$w * 1e6 / $n:.0f}us/req')"
}

ratios() { # direct haikutx httpGate [direct+fwd] lines
    d=$(echo "$1" | cut -d' ' -f2); g=$(echo "$2" | cut -d' ' -f2); p=$(echo "$3" | cut -d' ' -f2)
    f=$(echo "${4:-x $d}" | cut -d' ' -f2)
    "$PY" -c "print(f'haikutx/direct {$g/$d:.0%}  httpGate/direct {$p/$d:.0%}  haikutx/httpGate {$g/$p:.2f}x' + (f'  haikutx/direct+fwd {$g/$f:.0%}' if '${4:-}' else ''))"
}

"$PY" bench/hello_backend.py $BACK & BACKPID=$!
PIDS="$PIDS $BACKPID"
PYTHONPATH=. "${TWISTD:-.venv/bin/twistd}" -n --pidfile= --logfile=/dev/null haiku \
    --port none --sslport none --gate "tcp:$GATE:interface=127.0.0.1" & GATEPID=$!
PIDS="$PIDS $GATEPID"
LANG=C.UTF-8 "$HTTPGATE" $PIL $BACK
cat > "$NGXDIR/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $NGXDIR/nginx.pid;
error_log $NGXDIR/error.log;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $NGXDIR; proxy_temp_path $NGXDIR; fastcgi_temp_path $NGXDIR;
    uwsgi_temp_path $NGXDIR; scgi_temp_path $NGXDIR;
    upstream app { server 127.0.0.1:$BACK; keepalive 32; }
    server {
        listen 127.0.0.1:$NGX;
        location /$BACK/ {
            proxy_pass http://app/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Forwarded-Host \$http_host;
            proxy_buffering off;
        }
    }
}
EOF
nginx -c "$NGXDIR/nginx.conf" -p "$NGXDIR" & NGXMASTER=$!
PIDS="$PIDS $NGXMASTER"
wait_port $BACK; wait_port $GATE; wait_port $PIL; wait_port $NGX
NGXPID=$(pgrep -P "$NGXMASTER" | head -1)
# httpGate daemonizes: find its listening process to stop it afterwards.
PILPID=$(ss -Hltnp "sport = :$PIL" | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -1)
PIDS="$PIDS $PILPID"

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -sr), load $(cut -d' ' -f1-3 /proc/loadavg)"
r=0
while [ $r -lt "$ROUNDS" ]; do
    r=$((r + 1))
    echo "round $r: wrk -t1 -c$CONN -d${DUR}s, keep-alive, GET /$BACK/ through the gates"
    D=$(run direct "http://127.0.0.1:$BACK/")
    F=$(run direct+fwd "http://127.0.0.1:$BACK/" -H "X-Forwarded-For: 127.0.0.1" \
        -H "X-Forwarded-Proto: http" -H "X-Forwarded-Host: 127.0.0.1:$GATE")
    G=$(run haikutx "http://127.0.0.1:$GATE/$BACK/")
    P=$(run httpGate "http://127.0.0.1:$PIL/$BACK/")
    N=$(run nginx "http://127.0.0.1:$NGX/$BACK/")
    echo "$D"; echo "$F"; echo "$G"; echo "$P"; echo "$N"; ratios "$D" "$G" "$P" "$F"
    d=$(echo "$D" | cut -d' ' -f2) n=$(echo "$N" | cut -d' ' -f2)
    "$PY" -c "print(f'nginx/direct {$n/$d:.0%}')"
    echo "round $r: new connection per request (-H 'Connection: close')"
    D=$(run direct "http://127.0.0.1:$BACK/" -H "Connection: close")
    G=$(run haikutx "http://127.0.0.1:$GATE/$BACK/" -H "Connection: close")
    P=$(run httpGate "http://127.0.0.1:$PIL/$BACK/" -H "Connection: close")
    echo "$D"; echo "$G"; echo "$P"; ratios "$D" "$G" "$P"
done
