# The smallest handler: curl 'http://localhost:8080/?x-haiku-handler=hello.py'
res.write_head(200, {'Content-Type': 'text/plain'})
res.end('Hello, world!\n')
