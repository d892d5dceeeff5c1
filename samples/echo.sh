#!/bin/bash
# Echoes the request as JSON: method, path, params and body (like echo.py).
#   curl -d 'a=1&b=2' 'http://localhost:8080/some/path?x-haiku-handler=echo.sh&c=3'
# The request comes as CGI variables plus HAIKU_PARAMS (JSON); the body on stdin.

json_string() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\r'/\\r}
  s=${s//$'\t'/\\t}
  printf '"%s"' "$s"
}

IFS= read -r -d '' body || true
printf 'Content-Type: application/json\n\n'
printf '{"body": %s, "method": %s, "params": %s, "path": %s}\n' \
  "$(json_string "$body")" "$(json_string "$REQUEST_METHOD")" \
  "$HAIKU_PARAMS" "$(json_string "$PATH_INFO")"
