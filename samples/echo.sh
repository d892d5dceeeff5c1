#!/bin/bash
# Echoes the request as JSON: method, path, params and body (like echo.py).
#   curl -d 'a=1&b=2' 'http://localhost:8080/some/path?x-haiku-handler=echo.sh&c=3'
# The request comes as CGI variables plus HAIKU_PARAMS (JSON); the body on stdin.
# Builtins only: a sandboxed handler may not fork, so no $(...) or pipes.

json_string() {  # json_string VAR TEXT: VAR becomes TEXT as a JSON string
  local s=$2
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\r'/\\r}
  s=${s//$'\t'/\\t}
  printf -v "$1" '"%s"' "$s"
}

IFS= read -r -d '' body || true
json_string body "$body"
json_string method "$REQUEST_METHOD"
json_string path "$PATH_INFO"
printf 'Content-Type: application/json\n\n'
printf '{"body": %s, "method": %s, "params": %s, "path": %s}\n' \
  "$body" "$method" "$HAIKU_PARAMS" "$path"
