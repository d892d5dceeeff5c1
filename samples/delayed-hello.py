# Streams its answer in two parts a second apart:
#   curl -N 'http://localhost:8080/?x-haiku-handler=delayed-hello.py'
res.write_head(200, {'Content-Type': 'text/plain'})
res.write('Hello, ')
set_timeout(lambda: res.end('world!\n'), 1000)
