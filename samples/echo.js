// Echoes the request as JSON: method, path, params and body (like echo.py).
//   curl -d 'a=1&b=2' 'http://localhost:8080/some/path?x-haiku-handler=echo.js&c=3'
// The request comes as CGI variables plus HAIKU_PARAMS (JSON); the body on stdin.
const chunks = [];
process.stdin.on('data', (chunk) => chunks.push(chunk));
process.stdin.on('end', () => {
  process.stdout.write('Content-Type: application/json\n\n');
  process.stdout.write(JSON.stringify({
    body: Buffer.concat(chunks).toString('utf8'),
    method: process.env.REQUEST_METHOD,
    params: JSON.parse(process.env.HAIKU_PARAMS),
    path: process.env.PATH_INFO,
  }) + '\n');
});
