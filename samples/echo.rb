# Echoes the request as JSON: method, path, params and body (like echo.py).
#   curl -d 'a=1&b=2' 'http://localhost:8080/some/path?x-haiku-handler=echo.rb&c=3'
# The request comes as CGI variables plus HAIKU_PARAMS (JSON); the body on stdin.
require 'json'

body = $stdin.binmode.read.force_encoding('UTF-8').scrub
print "Content-Type: application/json\n\n"
puts JSON.generate({
  'body' => body,
  'method' => ENV['REQUEST_METHOD'],
  'params' => JSON.parse(ENV['HAIKU_PARAMS']),
  'path' => ENV['PATH_INFO'],
})
