# Echoes the request as JSON: method, path, params and body.
#   curl -d 'a=1&b=2' 'http://localhost:8080/some/path?x-haiku-handler=echo.py&c=3'
import json

res.write_head(200, {'Content-Type': 'application/json'})
res.end(json.dumps({
    'method': req.method,
    'path': req.path,
    'params': req.params,
    'body': req.body.decode('utf-8', 'replace'),
}, sort_keys=True) + '\n')
