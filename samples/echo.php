<?php
// Echoes the request as JSON: method, path, params and body (like echo.py).
//   curl -d 'a=1&b=2' 'http://localhost:8080/some/path?x-haiku-handler=echo.php&c=3'
// The request comes as CGI variables plus HAIKU_PARAMS (JSON); the body on stdin.
$body = file_get_contents('php://stdin');
echo "Content-Type: application/json\n\n";
echo json_encode([
    'body' => $body,
    'method' => getenv('REQUEST_METHOD'),
    'params' => json_decode(getenv('HAIKU_PARAMS')),
    'path' => getenv('PATH_INFO'),
], JSON_INVALID_UTF8_SUBSTITUTE | JSON_UNESCAPED_SLASHES), "\n";
